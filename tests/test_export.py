"""python -m cmsf_tf.export for plain TensorFlow/Keras users: backbone.keras, the trainable SavedModel root,
fine-tuning the loaded network, and the served k-NN classifier (--index=train) against evaluate knn — each
loaded in a fresh process that never imports cmsf_tf."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import run_cli
from tests.test_train_cli import assert_one_sentence_error


@pytest.fixture(scope="module")
def run_dir(tiny_msf_run):
    return tiny_msf_run


@pytest.fixture(scope="module")
def export_dir(run_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("exported") / "model"
    out = run_cli("cmsf_tf.export", f"--model_dir={run_dir}", f"--export_dir={d}", "--index=train")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "with a 512-image k-NN index" in out.stdout
    return d


LOADER = r"""
import json, sys
import numpy as np, tensorflow as tf, keras
export_dir, data = sys.argv[1], np.load(sys.argv[2])
rgb01 = lambda x: tf.image.grayscale_to_rgb(tf.constant(x, tf.float32) / 255.0)
test01, train01 = rgb01(data["test"]), rgb01(data["train"])
out = {}

# backbone.keras: built-in layers only.
backbone = keras.saving.load_model(export_dir + "/backbone.keras")
out["keras_features"] = backbone(test01[:8], training=False).numpy().tolist()
out["layer_modules"] = sorted({type(l).__module__.split(".")[0] for l in backbone._flatten_layers()})

# The SavedModel root: callable with [0, 1] images and a training argument.
loaded = tf.saved_model.load(export_dir)
out["root_features"] = loaded(test01[:8]).numpy().tolist()
out["root_variables"] = [len(loaded.variables), len(loaded.trainable_variables), len(loaded.regularization_losses)]
out["signatures"] = sorted(loaded.signatures.keys())

# The served k-NN classifier.
test_uint8 = tf.image.grayscale_to_rgb(tf.constant(data["test"]))
found = loaded.neighbours(test_uint8[:4])
out["neighbours"] = {k: v.numpy().tolist() for k, v in found.items()}
classified = loaded.classify(test_uint8)
out["classify_labels"] = classified["label"].numpy().tolist()
out["classify_scores"] = classified["scores"].numpy().tolist()
# Training mode (after the inference calls above: it updates BatchNorm's moving averages).
out["root_training_differs"] = float(tf.reduce_max(tf.abs(loaded(test01[:8], training=True) - loaded(test01[:8]))))

def fine_tune(model, optimizer, steps=12):
    keras.utils.set_random_seed(0)  # the new head's initial weights: the same every run
    net = keras.Sequential([keras.Input((28, 28, 3)), model, keras.layers.Dense(10)])
    net.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = [w.numpy().copy() for w in model.trainable_weights]
    history = net.fit(train01, data["train_labels"], batch_size=64, epochs=steps, verbose=0, shuffle=False)
    moved = max(float(np.abs(w.numpy() - b).max()) for w, b in zip(model.trainable_weights, before))
    return history.history["loss"], moved

# Fine-tune the .keras backbone, and the SavedModel wrapped as a trainable Keras layer (Keras 3.15's TFSMLayer
# names its weights "<name>:0", which optimizers with slot variables reject: plain SGD there).
out["keras_loss"], out["keras_moved"] = fine_tune(keras.saving.load_model(export_dir + "/backbone.keras"),
                                                  keras.optimizers.SGD(0.05, momentum=0.9))
layer = keras.layers.TFSMLayer(export_dir, call_endpoint="features", call_training_endpoint="features_train",
                               trainable=True)
out["tfsm_loss"], out["tfsm_moved"] = fine_tune(layer, keras.optimizers.SGD(0.1))

# Plain TensorFlow: the root in training mode under a GradientTape, any optimizer on its variables; four
# passes over the four batches (the test compares the first pass with the last), the head seeded.
keras.utils.set_random_seed(0)
head = keras.layers.Dense(10)
optimizer = keras.optimizers.SGD(0.05, momentum=0.9)
before = [v.numpy().copy() for v in loaded.trainable_variables]
labels = tf.constant(data["train_labels"], tf.int32)
losses = []
for step in range(16):
    with tf.GradientTape() as tape:
        batch = slice(64 * (step % 4), 64 * (step % 4 + 1))
        logits = head(loaded(train01[batch], training=True))
        batch_labels = labels[batch]
        loss = tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(batch_labels, logits, from_logits=True))
    variables = list(loaded.trainable_variables) + head.trainable_variables
    optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
    losses.append(float(loss))
out["tf_loss"] = losses
out["tf_moved"] = max(float(np.abs(v.numpy() - b).max()) for v, b in zip(loaded.trainable_variables, before))
out["imported_cmsf_tf"] = any(name.startswith("cmsf_tf") for name in sys.modules)
out["imported_scann"] = any(name.startswith("scann") for name in sys.modules)
print(json.dumps(out))
"""


def test_exports_load_fine_tune_and_classify_without_cmsf_tf(run_dir, export_dir, tmp_path, fmnist_full):
    test_images, test_labels = fmnist_full.test_images[:256], fmnist_full.test_labels[:256]
    train_images, train_labels = fmnist_full.train_images[:256], fmnist_full.train_labels[:256]
    np.savez(tmp_path / "data.npz", test=test_images, train=train_images, train_labels=train_labels)
    (tmp_path / "load.py").write_text(LOADER)
    # A working directory without cmsf_tf on its path: nothing can import it by accident.
    done = subprocess.run([sys.executable, str(tmp_path / "load.py"), str(export_dir), str(tmp_path / "data.npz")],
                          capture_output=True, text=True, timeout=600, cwd=str(tmp_path),
                          env={k: v for k, v in dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2").items() if k != "PYTHONPATH"})
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert not got["imported_cmsf_tf"]
    assert not got["imported_scann"]  # the exact index is stock TensorFlow: nothing else to load

    # Same features as the checkpoint's backbone on the evaluation view (28 px images: normalised only).
    import tensorflow as tf

    from cmsf_tf.data import augment
    from cmsf_tf.eval import encoder

    enc = encoder.from_checkpoint(str(run_dir))
    want = enc.features(tf.stack([augment.eval_view(tf.constant(im), 28) for im in test_images[:8]])).numpy()
    np.testing.assert_allclose(got["keras_features"], want, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got["root_features"], want, atol=1e-4, rtol=1e-4)
    assert got["layer_modules"] == ["keras"]
    assert got["root_training_differs"] > 1e-3  # batch statistics, not the moving averages
    assert got["root_variables"][0] == len(enc.backbone.variables)  # the normalisation holds constants
    assert got["root_variables"][1:] == [len(enc.backbone.trainable_variables), 0]
    assert {"serve", "serve_jpeg", "encode", "neighbours", "classify", "serving_default"} <= set(got["signatures"])

    # Fine-tuning the loaded network: the loss falls and the backbone's own weights move.
    for name in ("tfsm", "keras", "tf"):
        losses = got[f"{name}_loss"]
        assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4]), (name, losses)
        assert got[f"{name}_moved"] > 1e-4, name

    # The served classifier answers as evaluate knn does on the same run (exact search, 20-NN majority vote).
    out = run_cli("cmsf_tf.evaluate", "knn", f"--model_dir={run_dir}")
    assert out.returncode == 0, out.stderr[-3000:]
    knn = json.loads((run_dir / "eval" / "knn.json").read_text())
    served_top1 = float(np.mean(np.array(got["classify_labels"]) == test_labels))
    assert served_top1 == pytest.approx(knn["knn_top1_k20"], abs=1 / 256)

    # Neighbours and votes against a NumPy reference on the checkpoint's own features.
    from cmsf_tf.data import pipeline, sources
    from cmsf_tf.eval import knn as knn_lib

    source = sources.load("fashion_mnist", json.loads((run_dir / "flags.json").read_text())["data_dir"])
    index, index_labels = knn_lib.features_and_labels(enc.features, pipeline.eval_split(source, "train", 28, 128))
    queries, _ = knn_lib.features_and_labels(enc.features, pipeline.eval_split(source, "test", 28, 128))
    sims = queries @ index.T
    nbrs = np.argsort(-sims, axis=1, kind="stable")[:, :20]
    found = got["neighbours"]
    assert np.array(found["ids"]).shape == (4, 20)
    np.testing.assert_allclose(found["similarities"], np.take_along_axis(sims[:4], nbrs[:4], 1), atol=1e-4)
    assert found["labels"] == index_labels[np.array(found["ids"])].tolist()
    assert "file_names" not in found  # array data: the ids are the names
    votes = np.stack([np.bincount(index_labels[n], minlength=10) for n in nbrs])
    # The same votes, but where a near-tie in similarity swapped the 20th neighbour (one neighbour moved).
    diff = np.abs(np.array(got["classify_scores"]).round() - votes).sum(1)
    assert np.mean(diff > 0) <= 2 / 256 and diff.max() <= 2
    agree = np.mean(np.array(got["classify_labels"]) == votes.argmax(1))
    assert agree >= 1 - 2 / 256  # a near-tie in similarity may swap the 20th neighbour

    meta = json.loads((export_dir / "assets" / "cmsf_export.json").read_text())
    assert meta["index"] == {"size": 512, "k": 20, "vote": "majority", "temperature": 0.07, "search": "exact",
                             "dtype": "float32",
                             "subset": "all", "num_classes": 10, "file_names": False}


def test_served_index_of_the_labelled_subset_and_bad_index_flags(run_dir, tmp_path):
    d = tmp_path / "labelled"
    out = run_cli("cmsf_tf.export", f"--model_dir={run_dir}", f"--export_dir={d}", "--index=train",
                  "--index_split=labelled", "--knn_k=1,5", "--knn_vote=weighted", "--knn_search=approx")
    assert out.returncode == 0, out.stderr[-3000:]
    meta = json.loads((d / "assets" / "cmsf_export.json").read_text())["index"]
    assert meta["size"] == 128 and meta["k"] == 5 and meta["vote"] == "weighted" and meta["search"] == "approx"
    # The ScaNN flavour: served by ScaNN's TF ops, which the loading process registers with `import scann`.
    load = ("import sys, numpy as np, tensorflow as tf, scann\n"
            "m = tf.saved_model.load(sys.argv[1])\n"
            "found = m.neighbours(tf.zeros([3, 28, 28, 3], tf.uint8))\n"
            "ids = found['ids'].numpy()\n"
            "assert ids.shape == (3, 5) and ids.min() >= 0 and ids.max() < 128, ids\n"
            "assert m.classify(tf.zeros([3, 28, 28, 3], tf.uint8))['label'].shape == (3,)\n"
            "print('served')\n")
    served = subprocess.run([sys.executable, "-c", load, str(d)], capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert served.returncode == 0 and "served" in served.stdout, served.stderr[-3000:]
    assert meta["subset"] == "labelled:percent:25"
    assert_one_sentence_error(run_cli("cmsf_tf.export", f"--model_dir={run_dir}", f"--export_dir={tmp_path / 'x'}",
                                      "--index=test"), "unknown --index 'test'; choose one of: train")
    assert_one_sentence_error(run_cli("cmsf_tf.export", f"--model_dir={run_dir}", f"--export_dir={tmp_path / 'y'}",
                                      "--index=train", "--knn_k=600"), "--knn_k 600 is larger than the index")
    # export reads training runs only: no hint at --saved_model, which it does not take
    (tmp_path / "empty").mkdir()
    out = run_cli("cmsf_tf.export", f"--model_dir={tmp_path / 'empty'}", f"--export_dir={tmp_path / 'z'}")
    assert_one_sentence_error(out, r"no flags.json\); pass the --model_dir a training wrote")
    assert "--saved_model" not in out.stderr


def test_vote_and_tie_rule_match_evaluate_knn():
    import tensorflow as tf

    from cmsf_tf import export
    from cmsf_tf.eval import knn

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=(64, 6)).astype(np.int32)
    sims = rng.uniform(-1, 1, size=(64, 6)).astype(np.float32)
    majority = export.vote_scores(tf.constant(labels), tf.constant(sims), 4).numpy()
    np.testing.assert_array_equal(majority, knn.vote_counts(labels, 4))
    np.testing.assert_array_equal(export.first_argmax(tf.constant(majority)).numpy(), knn.majority_vote(labels, 4))
    weighted = export.vote_scores(tf.constant(labels), tf.constant(sims), 4, "weighted", 0.07).numpy()
    np.testing.assert_allclose(weighted, knn.weighted_vote_counts(labels, sims, 4, 0.07), rtol=1e-5)
    tied = tf.constant([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 5.0]])
    assert export.first_argmax(tied).numpy().tolist() == [1, 0, 3]


def test_the_tf1_session_loader_serves_the_backbone_and_the_classifier(export_dir, tmp_path, fmnist_full):
    """saved_model_cli run loads the SavedModel as TensorFlow Serving's C++ loader does (a TF1 session that
    restores the variables it finds in the object graph): features and k-NN answers equal tf.saved_model.load's."""
    import tensorflow as tf

    images = np.repeat(fmnist_full.test_images[:16], 3, axis=-1)
    np.save(tmp_path / "images.npy", images)
    loaded = tf.saved_model.load(str(export_dir))
    for signature, keys in (("serve", ("features",)), ("classify", ("label", "scores")),
                            ("neighbours", ("ids", "similarities", "labels"))):
        outdir = tmp_path / signature
        done = subprocess.run(
            [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli", "run", f"--dir={export_dir}",
             "--tag_set=serve", f"--signature_def={signature}", f"--inputs=images={tmp_path / 'images.npy'}",
             f"--outdir={outdir}"], capture_output=True, text=True, timeout=600,
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
        assert done.returncode == 0, done.stderr[-3000:]
        want = {k: v.numpy() for k, v in loaded.signatures[signature](images=tf.constant(images)).items()}
        got = {key: np.load(outdir / f"{key}.npy") for key in keys}
        for key in keys:
            if key in ("ids", "labels"):
                # The two loaders' round-off may order two neighbours of equal similarity (1e-7 apart) either
                # way: the same neighbours, each row's list a permutation of the other's.
                np.testing.assert_array_equal(np.sort(got[key], 1), np.sort(want[key], 1), err_msg=key)
                assert np.mean(got[key] != want[key]) < 0.02, key
            else:
                np.testing.assert_allclose(got[key], want[key], atol=1e-5, err_msg=f"{signature}: {key}")


def test_a_bfloat16_index_answers_as_the_float32_one_up_to_near_ties(run_dir, export_dir, tmp_path, fmnist_full):
    import tensorflow as tf

    d = tmp_path / "bf16"
    out = run_cli("cmsf_tf.export", f"--model_dir={run_dir}", f"--export_dir={d}", "--index=train",
                  "--index_dtype=bfloat16")
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((d / "assets" / "cmsf_export.json").read_text())["index"]["dtype"] == "bfloat16"
    half, full = tf.saved_model.load(str(d)), tf.saved_model.load(str(export_dir))
    assert half.index_features.dtype == tf.bfloat16 and full.index_features.dtype == tf.float32
    images = tf.constant(np.repeat(fmnist_full.test_images[:64], 3, axis=-1))
    a, b = full.neighbours(images), half.neighbours(images)
    # A bfloat16 row keeps 8 bits of mantissa: a unit row's similarity moves by at most ~2^-9, so every
    # neighbour the bfloat16 index returns is, by the float32 features, within 2^-8 of the float32 k-th
    # best, and the similarity it reports within 2^-8 of the float32 one. (This tiny network's features are
    # crowded, every similarity in 0.993-0.9997, so within that margin the neighbours reorder freely and 17%
    # of the votes change: bfloat16 suits indexes whose neighbours are further apart than 2^-8.)
    queries = full.serve(images)["features"].numpy()
    true = np.take_along_axis(queries @ full.index_features.numpy().T, b["ids"].numpy(), 1)
    kth = a["similarities"].numpy()[:, -1:]
    assert (true >= kth - 2.0 ** -8).all(), (true - kth).min()
    np.testing.assert_allclose(b["similarities"].numpy(), true, atol=2.0 ** -8)
    assert half.classify(images)["label"].shape == (64,)
    assert_one_sentence_error(run_cli("cmsf_tf.export", f"--model_dir={run_dir}", f"--export_dir={tmp_path / 'n'}",
                                      "--index_dtype=bfloat16"), r"--index_dtype applies to the exact index only")
