"""python -m cmsf_tf.evaluate and python -m cmsf_tf.export on a tiny run trained on the real Fashion-MNIST
slice: results against NumPy references, JSON files, TensorBoard scalars, the SavedModel path, bad input."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from cmsf_tf.eval import spectrum
from tests.conftest import TINY, read_events, run_cli
from tests.test_train_cli import assert_one_sentence_error


@pytest.fixture(scope="module")
def run_dir(tiny_msf_run):
    return tiny_msf_run


def evaluate(*args, timeout=600):
    return run_cli("cmsf_tf.evaluate", *args, timeout=timeout)


def in_process_features(run_dir, which="online"):
    """Features of the slice's train and test splits computed here, from the checkpoint."""
    from cmsf_tf.data import pipeline, sources
    from cmsf_tf.eval import encoder, knn

    flags = json.loads((run_dir / "flags.json").read_text())
    source = sources.load("fashion_mnist", flags["data_dir"])
    enc = encoder.from_checkpoint(str(run_dir), which=which)
    return (*knn.features_and_labels(enc.features, pipeline.eval_split(source, "train", 28, 128)),
            *knn.features_and_labels(enc.features, pipeline.eval_split(source, "test", 28, 128)), source)


def numpy_knn_accuracy(index, index_labels, queries, query_labels, k):
    nbrs = np.argsort(-(queries @ index.T), axis=1, kind="stable")[:, :k]
    votes = np.stack([np.bincount(index_labels[n], minlength=10) for n in nbrs])
    return float(np.mean(votes.argmax(1) == query_labels))


def test_knn_equals_numpy_on_the_checkpoint_features_and_writes_its_files(run_dir):
    out = evaluate("knn", f"--model_dir={run_dir}")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((run_dir / "eval" / "knn.json").read_text())
    train_x, train_y, test_x, test_y, _ = in_process_features(run_dir)
    for k in (1, 20):
        assert result[f"knn_top1_k{k}"] == pytest.approx(numpy_knn_accuracy(train_x, train_y, test_x, test_y, k),
                                                          abs=1 / 256)
    assert result["top1"] == result["knn_top1_k20"] and 0 <= result["top5"] <= 1
    assert result["index_size"] == 512 and result["queries"] == 256
    assert result["settings"] == {"k": [1, 20], "vote": "majority", "temperature": 0.07, "search": "exact",
                                  "index_split": "all"}
    assert result["network"]["step"] == 8 and result["network"]["encoder"] == "online"
    assert result["network"]["path"].endswith("ckpt-8") and result["wall_time_s"] > 0
    # TensorBoard scalars at the checkpoint's step.
    acc = read_events(str(run_dir / "tensorboard" / "eval"))
    events = acc.Tensors("eval/knn/knn_top1_k20")
    assert events[-1].step == 8
    assert float(tf.make_ndarray(events[-1].tensor_proto)) == pytest.approx(result["knn_top1_k20"])
    # RankMe of the index's (unit-length) features, in the JSON, the printout and TensorBoard
    assert result["rankme"] == pytest.approx(spectrum.rankme(train_x), abs=0.01) and result["feature_dim"] == 32
    assert f"RankMe of the index's features: {result['rankme']:.1f} of 32 dimensions" in out.stdout + out.stderr
    assert float(tf.make_ndarray(acc.Tensors("eval/knn/rankme")[-1].tensor_proto)) == pytest.approx(result["rankme"])

    # Cached features: another k and the weighted vote re-use them, nothing is extracted again.
    out = evaluate("knn", f"--model_dir={run_dir}", "--knn_k=1,5", "--knn_vote=weighted")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "extracting" not in out.stderr and "features of fashion_mnist from" in out.stderr
    again = json.loads((run_dir / "eval" / "knn.json").read_text())
    assert again["knn_top1_k1"] == result["knn_top1_k1"] and "knn_top1_k5" in again

    # The EMA target's backbone is another network.
    out = evaluate("knn", f"--model_dir={run_dir}", "--encoder=target", "--nocache_features")
    assert out.returncode == 0, out.stderr[-3000:]
    target = json.loads((run_dir / "eval" / "knn.json").read_text())
    t_train, t_train_y, t_test, t_test_y, _ = in_process_features(run_dir, "target")
    assert target["network"]["encoder"] == "target"
    assert target["knn_top1_k20"] == pytest.approx(numpy_knn_accuracy(t_train, t_train_y, t_test, t_test_y, 20),
                                                   abs=1 / 256)
    assert not np.allclose(t_train, train_x)


def test_knn_over_the_labelled_subset_and_k_larger_than_the_index(run_dir):
    out = evaluate("knn", f"--model_dir={run_dir}", "--index_split=labelled", "--knn_k=1")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((run_dir / "eval" / "knn.json").read_text())
    assert result["index_size"] == 128  # 25% of 512, the run's own split (same seed)
    assert result["settings"]["index_split"] == "labelled:percent:25"
    from cmsf_tf.data import splits

    train_x, train_y, test_x, test_y, source = in_process_features(run_dir)
    labelled = splits.percent_split(source.train_labels, 25, 0)
    assert result["knn_top1_k1"] == pytest.approx(
        numpy_knn_accuracy(train_x[labelled], train_y[labelled], test_x, test_y, 1), abs=1 / 256)

    out = evaluate("knn", f"--model_dir={run_dir}", "--index_split=labelled", "--knn_k=200")
    assert_one_sentence_error(out, r"--knn_k 200 is larger than the index \(128 images\)")


def test_linear_probe_writes_accuracies_and_settings(run_dir):
    out = evaluate("linear", f"--model_dir={run_dir}", "--linear_epochs=20", "--linear_milestones=15,18",
                   "--linear_lr=0.1", "--nolinear_augment", "--seed=3")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((run_dir / "eval" / "linear.json").read_text())
    # An 8-step network on 512 images: well above chance (10%).
    assert 0.3 < result["top1"] <= 1 and result["top1"] <= result["top5"]
    assert 0.1 < result["train_top1"] <= 1
    # The paper's code reports the best epoch (on the test split); the last one is kept beside it.
    per_epoch = result["top1_per_epoch"]
    assert len(per_epoch) == 20 and result["top1"] == max(per_epoch) and result["top1_last"] == per_epoch[-1]
    assert per_epoch[result["best_epoch"] - 1] == result["top1"] and "best epoch" in result["selection"]
    assert result["settings"]["milestones"] == [15, 18] and result["settings"]["augment"] is False
    assert result["settings"]["weight_decay"] == 1e-4 and result["settings"]["views"] == "cached centre crops"
    assert "best epoch" in out.stdout

    out = evaluate("linear", f"--model_dir={run_dir}", "--linear_epochs=2")  # the paper's probe is the default
    assert out.returncode == 0, out.stderr[-3000:]
    settings = json.loads((run_dir / "eval" / "linear.json").read_text())["settings"]
    assert settings["augment"] is True and settings["views"] == "random resized crop (0.08-1) + flip"


def test_semi_supervised_protocol_trains_a_head_on_the_labelled_subset(run_dir, tmp_path):
    semi_dir = tmp_path / "semi"
    semi_dir.mkdir()
    shutil.copy(run_dir / "flags.json", semi_dir / "flags.json")
    out = evaluate("semi", f"--model_dir={semi_dir}", f"--checkpoint={tf.train.latest_checkpoint(str(run_dir / 'checkpoints'))}",
                   "--semi_epochs=4", "--semi_batch_size=32", "--semi_lr=0.1", "--semi_crop_min_scale=1")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((semi_dir / "eval" / "semi.json").read_text())
    assert result["labelled_images"] == 128  # the run's 25% split of 512
    assert len(result["top1_per_epoch"]) == 4 and result["top1"] == max(result["top1_per_epoch"])
    assert result["top1"] > 0.1 and result["top1"] <= result["top5"]  # above chance; learning: tests/test_semi.py
    assert result["loss_per_epoch"][-1] < result["loss_per_epoch"][0]
    assert result["settings"]["label_split"] == "percent:25" and result["settings"]["weight_decay"] == 1e-4
    assert result["settings"]["milestones"] == [15, 35, 50]
    assert_one_sentence_error(evaluate("semi", f"--model_dir={run_dir}", f"--saved_model={tmp_path}"),
                              "semi needs a training checkpoint")


def test_finetune_trains_the_labelled_subset_and_improves(run_dir, tmp_path):
    ft_dir = tmp_path / "ft"
    ft_dir.mkdir()
    shutil.copy(run_dir / "flags.json", ft_dir / "flags.json")
    out = evaluate("finetune", f"--model_dir={ft_dir}", f"--checkpoint={tf.train.latest_checkpoint(str(run_dir / 'checkpoints'))}",
                   "--label_split=percent:50", "--finetune_epochs=6", "--finetune_batch_size=32",
                   "--finetune_lr=0.05", "--finetune_head_lr=0.1", "--finetune_crop_min_scale=1")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((ft_dir / "eval" / "finetune.json").read_text())
    assert result["labelled_images"] == 256
    losses = result["loss_per_epoch"]
    assert len(losses) == 6 and losses[-1] < 0.8 * losses[0]
    assert result["top1"] > 0.3  # chance is 0.1; an 8-step width-4 network after 48 fine-tuning steps
    # The run's checkpoint is untouched: fine-tuning works on a copy of the backbone in memory.
    assert tf.train.latest_checkpoint(str(run_dir / "checkpoints")).endswith("ckpt-8")


def test_transfer_on_two_tfds_mock_data_sets(run_dir, tmp_path):
    import tensorflow_datasets as tfds
    from absl import flags

    from cmsf_tf import config
    from cmsf_tf import evaluate as evaluation

    config.define_flags()
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["evaluate", f"--model_dir={tmp_path}", "--transfer_datasets=cifar10,mnist",
                 f"--checkpoint={tf.train.latest_checkpoint(str(run_dir / 'checkpoints'))}", "--transfer_max_iter=50"])
    shutil.copy(run_dir / "flags.json", tmp_path / "flags.json")
    cfg = config.eval_from_flags("transfer")
    with tfds.testing.mock_data(num_examples=40):
        result = evaluation.evaluate(cfg, log=lambda message: None)
    flags.FLAGS.unparse_flags()
    assert set(result["datasets"]) == {"cifar10", "mnist"}
    for r in result["datasets"].values():
        assert 0 <= r["top1"] <= 1 and r["l2"] in cfg.transfer_l2 and len(r["val_top1"]) == len(cfg.transfer_l2)
    assert result["mean_top1"] == pytest.approx(np.mean([r["top1"] for r in result["datasets"].values()]))
    assert json.loads((tmp_path / "eval" / "transfer.json").read_text())["datasets"].keys() == result["datasets"].keys()


SERVE_SCRIPT = r"""
import json, sys
import numpy as np, tensorflow as tf
loaded = tf.saved_model.load(sys.argv[1])
images = np.load(sys.argv[2])
jpegs = [tf.io.encode_jpeg(tf.image.grayscale_to_rgb(tf.constant(im)), quality=95).numpy() for im in images]
png = tf.io.encode_png(tf.image.grayscale_to_rgb(tf.constant(images[1]))).numpy()
mixed = loaded.serve_jpeg(tf.constant([jpegs[0], b"not an image", b"", png]))
empty = loaded.serve_jpeg(tf.constant([], tf.string))
out = {"serve": loaded.serve(tf.image.grayscale_to_rgb(tf.constant(images)))["features"].numpy().tolist(),
       "jpeg": loaded.serve_jpeg(tf.constant(jpegs))["features"].numpy().tolist(),
       "mixed": mixed["features"].numpy().tolist(), "mixed_ok": mixed["ok"].numpy().tolist(),
       "empty": list(empty["features"].shape) + list(empty["ok"].shape),
       "signatures": sorted(loaded.signatures.keys())}
print(json.dumps(out))
"""


def test_export_serves_in_a_fresh_process_and_evaluates_like_the_checkpoint(run_dir, tmp_path, fmnist_full):
    export_dir = tmp_path / "export"
    out = run_cli("cmsf_tf.export", f"--model_dir={run_dir}", f"--export_dir={export_dir}")
    assert out.returncode == 0, out.stderr[-3000:]
    meta = json.loads((export_dir / "assets" / "cmsf_export.json").read_text())
    assert meta["step"] == 8 and meta["image_size"] == 28 and meta["arch"] == "resnet18_small"

    # Serving signatures, reloaded by a process that never saw the model's code.
    images = fmnist_full.test_images[:6, ..., 0:1]
    np.save(tmp_path / "images.npy", images)
    script = tmp_path / "serve.py"
    script.write_text(SERVE_SCRIPT)
    served = subprocess.run([sys.executable, str(script), str(export_dir), str(tmp_path / "images.npy")],
                            capture_output=True, text=True, timeout=300, cwd=str(tmp_path),
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert served.returncode == 0, served.stderr[-3000:]
    served = json.loads(served.stdout.strip().splitlines()[-1])
    assert {"serve", "serve_jpeg", "encode"} <= set(served["signatures"])

    from cmsf_tf.data import augment
    from cmsf_tf.eval import encoder

    enc = encoder.from_checkpoint(str(run_dir))
    want = tf.math.l2_normalize(enc.features(tf.stack([augment.eval_view(tf.constant(im), 28) for im in images])), -1)
    np.testing.assert_allclose(served["serve"], want.numpy(), atol=1e-5)
    jpegs = [tf.io.encode_jpeg(tf.image.grayscale_to_rgb(tf.constant(im)), quality=95) for im in images]
    want_jpeg = tf.math.l2_normalize(enc.features(tf.stack([augment.eval_view(j, 28) for j in jpegs])), -1)
    np.testing.assert_allclose(served["jpeg"], want_jpeg.numpy(), atol=1e-4)
    # One bad item (not an image, or empty) does not fail the batch: zeros and ok = False for it alone.
    assert served["mixed_ok"] == [True, False, False, True]
    mixed = np.array(served["mixed"])
    np.testing.assert_allclose(mixed[0], want_jpeg.numpy()[0], atol=1e-4)
    png = tf.io.encode_png(tf.image.grayscale_to_rgb(tf.constant(images[1])))
    want_png = tf.math.l2_normalize(enc.features(augment.eval_view(png, 28)[None]), -1)
    np.testing.assert_allclose(mixed[3], want_png.numpy()[0], atol=1e-4)
    assert not mixed[1:3].any()
    assert served["empty"] == [0, want.shape[1], 0]

    # evaluate --saved_model gives the checkpoint's k-NN numbers.
    out = evaluate("knn", f"--saved_model={export_dir}", f"--model_dir={tmp_path / 'sm_eval'}")
    assert out.returncode == 0, out.stderr[-3000:]
    from_saved = json.loads((tmp_path / "sm_eval" / "eval" / "knn.json").read_text())
    train_x, train_y, test_x, test_y, _ = in_process_features(run_dir)
    assert from_saved["network"]["kind"] == "saved_model" and from_saved["dataset"] == "fashion_mnist"
    assert from_saved["knn_top1_k20"] == pytest.approx(numpy_knn_accuracy(train_x, train_y, test_x, test_y, 20),
                                                       abs=1 / 256)

    out = run_cli("cmsf_tf.export", f"--model_dir={run_dir}", f"--export_dir={export_dir}")
    assert_one_sentence_error(out, "exists and is not empty")


def test_bad_input_fails_with_one_sentence(run_dir, tmp_path, fmnist_slice):
    assert_one_sentence_error(evaluate("knn", f"--model_dir={tmp_path / 'nowhere'}"), "does not exist")
    (tmp_path / "empty").mkdir()
    assert_one_sentence_error(evaluate("knn", f"--model_dir={tmp_path / 'empty'}"),
                              r"no flags.json\); pass the --model_dir a training wrote, or an export with --saved_model")
    assert_one_sentence_error(evaluate("cluster", f"--model_dir={run_dir}"), "unknown protocol 'cluster'; choose one of: knn, linear, semi, finetune, transfer")
    assert_one_sentence_error(evaluate("knn", f"--model_dir={run_dir}", "--image_size=32"),
                              "takes 28 px images, --image_size says 32")
    assert_one_sentence_error(evaluate("knn", f"--model_dir={run_dir}", "--knn_vote=soft"), "unknown --knn_vote")
    assert_one_sentence_error(evaluate("knn", f"--model_dir={run_dir}", f"--checkpoint={tmp_path}/ckpt-3"),
                              "does not exist")
    # A checkpoint of another architecture: say what it holds.
    other = tmp_path / "other"
    out = run_cli("cmsf_tf.train", *TINY, "--width=8", f"--data_dir={fmnist_slice}", f"--model_dir={other}",
                  "--epochs=1", "--steps_per_epoch=1", "--noknn_eval")
    assert out.returncode == 0, out.stderr[-3000:]
    out = evaluate("knn", f"--model_dir={run_dir}", f"--checkpoint={tf.train.latest_checkpoint(str(other / 'checkpoints'))}")
    assert_one_sentence_error(out, r"holds a resnet18_small, width 8 backbone, not the resnet18_small, width 4")
    assert_one_sentence_error(evaluate("finetune", f"--model_dir={run_dir}", f"--saved_model={tmp_path}"),
                              "finetune needs a training checkpoint")
    assert_one_sentence_error(evaluate("knn", f"--model_dir={tmp_path / 'x'}", f"--saved_model={tmp_path}"),
                              "is not a SavedModel directory")
