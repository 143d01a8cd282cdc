"""Input pipeline: stable indices, per-epoch shuffling, 2-shard split, exact skip, labels in the graph,
for each kind of source (in memory, image folder, TFRecords, streamed TFDS)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from cmsf_tf.data import pipeline, sources, splits
from tests.conftest import REPO, make_image_tree

ARGS = dict(image_size=16, seed=3, crop_min_scale=0.2, blur_prob=0.5)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("tree")
    make_image_tree(str(root), per_class=8)
    return str(root)


@pytest.fixture(scope="module")
def records(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("tfr")
    run = subprocess.run([sys.executable, "tools/folder_to_tfrecord.py", f"--data_dir={folder}",
                          f"--output_dir={out}", "--train_shards=4", "--val_shards=2"],
                         cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO))
    assert run.returncode == 0, run.stderr[-2000:]
    assert "wrote 24 training and 6 validation images in 6 shards" in run.stdout
    return str(out)


def collect(ds, keys=("index", "label", "true_label", "is_labelled")):
    out = {k: [] for k in keys}
    for batch in ds:
        for k in keys:
            out[k].append(batch[k].numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def stream(source, steps, epochs=(0, 1), **kw):
    return pipeline.train_dataset(source, global_batch=4, steps_per_epoch=steps, start_epoch=epochs[0],
                                  end_epoch=epochs[1], **ARGS, **kw)


def context(pipelines, index):
    return tf.distribute.InputContext(num_input_pipelines=pipelines, input_pipeline_id=index,
                                      num_replicas_in_sync=pipelines)


@pytest.mark.parametrize("kind", ["memory", "folder", "tfrecord"])
def test_each_epoch_visits_every_index_once_in_a_new_order(kind, folder, records):
    src = {"memory": lambda: sources.InMemorySource(
               "m", np.zeros((24, 8, 8, 1), np.uint8), np.arange(24, dtype=np.int32) % 3,
               np.zeros((4, 8, 8, 1), np.uint8), np.zeros(4, np.int32), 3),
           "folder": lambda: sources.load_folder(folder),
           "tfrecord": lambda: sources.load_tfrecord(records)}[kind]()
    got = collect(stream(src, 6, epochs=(0, 2)))
    first, second = got["index"][:24], got["index"][24:]
    assert sorted(first) == list(range(24)) and sorted(second) == list(range(24))
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(got["true_label"], np.asarray(src.train_labels)[got["index"]])
    again = collect(stream(src, 6, epochs=(1, 2)))  # epoch 1 alone: the same order
    np.testing.assert_array_equal(again["index"], second)
    resumed = collect(stream(src, 6, epochs=(1, 2), skip_steps=2))  # exact mid-epoch resume
    np.testing.assert_array_equal(resumed["index"], second[8:])


@pytest.mark.parametrize("kind", ["folder", "tfrecord"])
def test_two_input_pipelines_are_disjoint_and_complete(kind, folder, records):
    src = sources.load_folder(folder) if kind == "folder" else sources.load_tfrecord(records)
    shards = [collect(stream(src, 6, input_context=context(2, i)))["index"] for i in range(2)]
    assert not set(shards[0]) & set(shards[1])
    assert sorted(np.concatenate(shards)) == list(range(24))
    if kind == "folder":  # random access: the two halves of every global batch of one device
        whole = collect(stream(src, 6))["index"].reshape(6, 4)
        np.testing.assert_array_equal(shards[0].reshape(6, 2), whole[:, :2])
        np.testing.assert_array_equal(shards[1].reshape(6, 2), whole[:, 2:])


def test_views_and_third_view_have_the_right_shape(folder):
    batch = next(iter(stream(sources.load_folder(folder), 2, third_view=True)))
    for key in ("weak", "strong", "third"):
        assert batch[key].shape == (4, 16, 16, 3) and batch[key].dtype == tf.uint8  # converted in the train step
    assert not np.allclose(batch["weak"].numpy(), batch["third"].numpy())
    # For TPUs (no uint8 input) the same pixel levels travel as bfloat16, exactly.
    tpu = next(iter(stream(sources.load_folder(folder), 2, third_view=True, view_dtype=tf.bfloat16)))
    for key in ("weak", "strong", "third"):
        assert tpu[key].dtype == tf.bfloat16
        np.testing.assert_array_equal(tf.cast(tpu[key], tf.uint8).numpy(), batch[key].numpy())


def test_views_are_the_augment_functions_of_the_example_seed():
    """Reference for what the stream carries: batch j of epoch e holds, for dataset index i, exactly
    weak_view / strong_view / weak_view (third) of image i with the three parts of example_seed(seed, e, i),
    and the epoch's order is epoch_order(seed, e)."""
    from cmsf_tf.data import augment

    rng = np.random.default_rng(5)
    src = sources.InMemorySource("random", rng.integers(0, 256, (12, 20, 20, 3), np.uint8),
                                 rng.integers(0, 3, 12).astype(np.int32), None, None, 3)
    batches = list(stream(src, 3, epochs=(1, 2), third_view=True))
    order = pipeline.epoch_order(12, ARGS["seed"], 1).numpy()
    np.testing.assert_array_equal(np.concatenate([b["index"].numpy() for b in batches]), order)
    scale = (ARGS["crop_min_scale"], 1.0)
    for batch in batches:
        for j, index in enumerate(batch["index"].numpy()):
            s = tf.random.experimental.stateless_split(pipeline.example_seed(ARGS["seed"], 1, index), 3)
            image = src.train_images[index]
            want = {"weak": augment.weak_view(image, 16, s[0], crop_scale=scale),
                    "strong": augment.strong_view(image, 16, s[1], crop_scale=scale, blur_p=ARGS["blur_prob"]),
                    "third": augment.weak_view(image, 16, s[2], crop_scale=scale)}
            for key, view in want.items():
                np.testing.assert_allclose(batch[key][j].numpy(), view.numpy(), atol=1e-6, err_msg=key)
            assert batch["label"][j] == src.train_labels[index] == batch["true_label"][j]


def test_small_crops_are_strong_views_of_their_own_seeds_and_resume_exactly():
    """--multi_crop: batch["small"] [B, n, s, s, 3] uint8 holds, for dataset index i, strong_view of image i
    at the small size and scale with the seeds small_crop_seeds(seed, epoch, i, n); a stream skipped to
    step 1 carries step 1's small crops."""
    from cmsf_tf.data import augment

    rng = np.random.default_rng(6)
    src = sources.InMemorySource("random", rng.integers(0, 256, (12, 20, 20, 3), np.uint8),
                                 rng.integers(0, 3, 12).astype(np.int32), None, None, 3)
    spec = (3, 8, 0.1, 0.4)
    batches = list(stream(src, 3, multi_crop=spec))
    batch = batches[0]
    assert batch["small"].shape == (4, 3, 8, 8, 3) and batch["small"].dtype == tf.uint8
    for j, index in enumerate(batch["index"].numpy()):
        seeds = pipeline.small_crop_seeds(ARGS["seed"], 0, index, 3)
        for v in range(3):
            want = augment.strong_view(src.train_images[index], 8, seeds[v], crop_scale=(0.1, 0.4),
                                       blur_p=ARGS["blur_prob"])
            np.testing.assert_array_equal(batch["small"][j, v].numpy(), want.numpy())
    resumed = next(iter(pipeline.train_dataset(src, global_batch=4, steps_per_epoch=3, start_epoch=0, end_epoch=1,
                                               skip_steps=1, multi_crop=spec, **ARGS)))
    for key in ("small", "strong", "weak", "index"):
        np.testing.assert_array_equal(resumed[key].numpy(), batches[1][key].numpy(), err_msg=key)


def test_label_plan_in_the_graph_equals_the_numpy_labels():
    n, classes = 200, 5
    true = np.arange(n, dtype=np.int32) % classes
    src = sources.InMemorySource("m", np.zeros((n, 4, 4, 1), np.uint8), true, np.zeros((1, 4, 4, 1), np.uint8),
                                 np.zeros(1, np.int32), classes)
    shift = splits.noise_shift(n, 25, classes, seed=1)
    labelled = splits.random_split(n, 10, seed=1)
    plan = pipeline.LabelPlan(classes, shift=shift, labelled=labelled)
    got = collect(pipeline.train_dataset(src, global_batch=8, steps_per_epoch=25, start_epoch=0, end_epoch=1,
                                         labels=plan, **ARGS))
    want = splits.training_labels(splits.noisy_labels(true, 25, classes, seed=1), labelled)
    np.testing.assert_array_equal(got["label"], want[got["index"]])
    np.testing.assert_array_equal(got["is_labelled"], labelled[got["index"]])
    assert labelled.sum() == 20 and (shift > 0).sum() == 50
    by_name = pipeline.LabelPlan(classes, labelled_names=("3", "17"))  # in-memory names are indices
    got = collect(pipeline.train_dataset(src, global_batch=8, steps_per_epoch=25, start_epoch=0, end_epoch=1,
                                         labels=by_name, **ARGS))
    assert sorted(got["index"][got["is_labelled"]]) == [3, 17]


def test_streamed_tfds_imagenet_has_stable_indices():
    with tfds.testing.mock_data(num_examples=12):
        src = sources.load("tfds:imagenet2012")
        assert isinstance(src, sources.RecordSource) and src.num_train == 12 and src.num_classes == 1000
        got = collect(stream(src, 3, epochs=(0, 2)))
        again = collect(stream(src, 3, epochs=(0, 2)))
        batches = list(pipeline.eval_split(src, "test", 24, 5))
        labels = np.concatenate([y.numpy() for _, y in batches])
        assert batches[0][0].shape == (5, 24, 24, 3) and len(labels) == 12
    assert sorted(got["index"][:12]) == list(range(12)) and sorted(got["index"][12:]) == list(range(12))
    np.testing.assert_array_equal(got["index"], again["index"])
    np.testing.assert_array_equal(got["true_label"], again["true_label"])


SMALL = ["--method=msf", "--arch=resnet18_small", "--width=4", "--image_size=32", "--batch_size=8",
         "--bank_size=16", "--topk=2", "--proj_hidden=16", "--proj_dim=8", "--epochs=1", "--log_steps=1",
         "--eval_batch_size=8"]


def test_training_runs_on_a_folder_with_a_corrupt_file_and_on_its_tfrecords(folder, records, tmp_path):
    import json

    from tests.conftest import run_cli

    broken = os.path.join(folder, "train", "owl", "owl_broken.JPEG")
    with open(broken, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 truncated")
    try:
        out = run_cli("cmsf_tf.train", *SMALL, "--dataset=folder", f"--data_dir={folder}",
                      f"--model_dir={tmp_path / 'f'}", "--max_corrupt_fraction=0.1")
    finally:
        os.remove(broken)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"warning: skipping {broken}: truncated JPEG" in out.stdout
    result = json.loads((tmp_path / "f" / "result.json").read_text())
    assert result["steps"] == 3 and 0 <= result["knn_top1_k20"] <= 1

    out = run_cli("cmsf_tf.train", *SMALL, "--dataset=tfrecord", f"--data_dir={records}",
                  f"--model_dir={tmp_path / 'r'}", "--label_split=percent:50", "--method=cmsf_sup", "--topk=2")
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((tmp_path / "r" / "result.json").read_text())["steps"] == 3


def test_training_streams_tfds_imagenet(tmp_path):
    from cmsf_tf import config, train

    cfg = config.make(dataset="tfds:imagenet2012", model_dir=str(tmp_path / "run"), arch="resnet18_small",
                      width=4, image_size=32, epochs=1, batch_size=8, bank_size=16, topk=2, proj_hidden=16,
                      proj_dim=8, checkpoint_steps=0, eval_batch_size=8, label_noise=10, shuffle_buffer=16)
    with tfds.testing.mock_data(num_examples=16):
        result = train.run(cfg, log=lambda *_: None)
    assert result["steps"] == 2 and 0 <= result["knn_top1_k1"] <= 1


def test_self_supervised_training_on_unlabelled_images_and_what_is_refused(tmp_path):
    import json

    from tests.conftest import run_cli
    from tests.test_sources import _unlabelled_tree
    from tests.test_train_cli import assert_one_sentence_error

    _unlabelled_tree(tmp_path / "data")
    data = f"--data_dir={tmp_path / 'data'}"
    out = run_cli("cmsf_tf.train", *SMALL, "--dataset=images", data, f"--model_dir={tmp_path / 'ssl'}",
                  "--method=cmsf_2q", "--knn_every=1")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "k-NN uses the labelled val/ split (6 images as the index, 6 as queries)" in out.stdout
    result = json.loads((tmp_path / "ssl" / "result.json").read_text())
    assert result["steps"] == 1 and 0 <= result["knn_top1_k1"] <= 1 and "knn_top1_k20" not in result
    assert len(result["knn_curve"]) == 1
    ev = run_cli("cmsf_tf.evaluate", "knn", f"--model_dir={tmp_path / 'ssl'}", "--knn_k=1,5")
    assert ev.returncode == 0, ev.stderr[-3000:]
    knn = json.loads((tmp_path / "ssl" / "eval" / "knn.json").read_text())
    assert knn["index_size"] == 6 and knn["queries"] == 6
    assert knn["knn_top1_k1"] == result["knn_top1_k1"]
    # The served index is the one k-NN evaluates: the labelled val/ half, never the label-less train/.
    ex = run_cli("cmsf_tf.export", f"--model_dir={tmp_path / 'ssl'}", f"--export_dir={tmp_path / 'export'}",
                 "--index=train", "--knn_k=1")
    assert ex.returncode == 0, ex.stderr[-3000:]
    assert "k-NN over the labelled val/ split (6 images as the index, 6 as queries)" in ex.stderr
    assert "with a 6-image k-NN index" in ex.stdout
    assert_one_sentence_error(run_cli("cmsf_tf.evaluate", "linear", f"--model_dir={tmp_path / 'ssl'}"),
                              r"the linear probe needs labels, and images's training images have none")
    assert_one_sentence_error(run_cli("cmsf_tf.train", *SMALL, "--dataset=images", data,
                                      f"--model_dir={tmp_path / 'sup'}", "--method=cmsf_sup"),
                              r"--method=cmsf_sup needs labels, .*; train a self-supervised method")
    assert_one_sentence_error(run_cli("cmsf_tf.train", *SMALL, "--dataset=images", data,
                                      f"--model_dir={tmp_path / 'split'}", "--label_split=percent:10"),
                              "--label_split/--label_noise need labels")

    # No labelled val/: self-supervised training still runs (no k-NN, said so); k-NN evaluation is refused.
    _unlabelled_tree(tmp_path / "bare", with_val=False)
    bare = f"--data_dir={tmp_path / 'bare'}"
    out = run_cli("cmsf_tf.train", *SMALL, "--dataset=folder", bare, f"--model_dir={tmp_path / 'b'}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "no k-NN evaluation: it needs labels" in out.stdout
    assert "knn_top1_k1" not in json.loads((tmp_path / "b" / "result.json").read_text())
    assert_one_sentence_error(run_cli("cmsf_tf.evaluate", "knn", f"--model_dir={tmp_path / 'b'}"),
                              r"k-NN evaluation needs labels, .* no labelled val/<class>/ folder")
    assert_one_sentence_error(run_cli("cmsf_tf.export", f"--model_dir={tmp_path / 'b'}", "--index=train",
                                      f"--export_dir={tmp_path / 'b_export'}"),
                              r"k-NN evaluation needs labels, .* no labelled val/<class>/ folder")
    assert not (tmp_path / "b_export").exists()
    assert_one_sentence_error(run_cli("cmsf_tf.train", *SMALL, "--dataset=folder", bare,
                                      f"--model_dir={tmp_path / 'c'}", "--knn_every=1"),
                              "--knn_every needs labels")


@pytest.mark.parametrize("kind", ["memory", "folder", "tfrecord"])
def test_the_tpu_input_path_has_static_shapes_and_only_tpu_dtypes(kind, folder, records):
    """What TPUStrategy feeds its compiled step, checked on CPU: the per-replica batches of each source kind
    with the views as bfloat16 pixel levels (distribute.view_dtype's choice under TPUStrategy) have fully
    static shapes (drop_remainder), carry no strings (file names, encoded images stay in the pipeline) and no
    uint8, and hold exactly the levels of the uint8 stream."""
    from cmsf_tf import distribute
    from cmsf_tf.data import augment

    assert distribute.view_dtype(tf.distribute.get_strategy()) == tf.uint8
    src = {"memory": lambda: sources.InMemorySource(
               "m", np.arange(24 * 8 * 8, dtype=np.int64).reshape(24, 8, 8, 1).astype(np.uint8),
               np.arange(24, dtype=np.int32) % 3, None, None, 3),
           "folder": lambda: sources.load_folder(folder),
           "tfrecord": lambda: sources.load_tfrecord(records)}[kind]()
    streams = {dtype: pipeline.train_dataset(src, global_batch=4, steps_per_epoch=3, start_epoch=0, end_epoch=1,
                                             third_view=True, view_dtype=dtype, input_context=context(2, 0), **ARGS)
               for dtype in (tf.bfloat16, tf.uint8)}
    spec = streams[tf.bfloat16].element_spec
    assert set(spec) == {"weak", "strong", "third", "label", "true_label", "is_labelled", "index"}
    for name, s in spec.items():
        assert s.shape.is_fully_defined() and s.shape[0] == 2, (name, s.shape)
        assert s.dtype in (tf.bfloat16, tf.int32, tf.int64, tf.bool), (name, s.dtype)
    for levels, pixels in zip(streams[tf.bfloat16], streams[tf.uint8]):
        for view in ("weak", "strong", "third"):
            np.testing.assert_array_equal(tf.cast(levels[view], tf.float32).numpy(), pixels[view].numpy())
            np.testing.assert_array_equal(augment.model_views(levels)[view].numpy(),
                                          augment.model_views(pixels)[view].numpy())
