"""python -m cmsf_tf.evaluate projector: TensorBoard projector files and the bank-neighbour grid, checked
against the checkpoint's features and a NumPy search of its bank."""

import json

import numpy as np
import pytest
import tensorflow as tf

from cmsf_tf.eval import projector
from tests.conftest import TINY, read_events, run_cli


def test_sample_sprite_and_thumbnail_side():
    assert projector.evenly_spaced(10, 4).tolist() == [0, 3, 6, 9]
    assert projector.evenly_spaced(3, 10).tolist() == [0, 1, 2]
    assert projector.thumbnail_side(2000, 28) == 28 and projector.thumbnail_side(2000, 224) == 8192 // 45
    thumbs = np.arange(5 * 2 * 2 * 3, dtype=np.uint8).reshape(5, 2, 2, 3)
    grid = projector.sprite(thumbs)
    assert grid.shape == (6, 6, 3)  # 3 x 3 cells of 2 px, row-major
    np.testing.assert_array_equal(grid[0:2, 2:4], thumbs[1])
    np.testing.assert_array_equal(grid[2:4, 2:4], thumbs[4])
    assert not grid[4:].any()


@pytest.fixture(scope="module")
def run_2q(tmp_path_factory, fmnist_slice):
    d = tmp_path_factory.mktemp("projector") / "run"
    out = run_cli("cmsf_tf.train", *TINY, "--method=cmsf_2q", "--topk_prime=6", f"--data_dir={fmnist_slice}",
                  f"--model_dir={d}", "--epochs=3", "--steps_per_epoch=16", "--label_split=percent:25",
                  "--noknn_eval")
    assert out.returncode == 0, out.stderr[-3000:]
    return d


def test_projector_files_and_constrained_neighbours(run_2q, fmnist_full):
    out = run_cli("cmsf_tf.evaluate", "projector", f"--model_dir={run_2q}", "--projector_images=100",
                  "--projector_queries=4")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "plain bank neighbours" in out.stdout and "constrained bank neighbours" in out.stdout
    pdir = run_2q / "tensorboard" / "projector"

    # Metadata: evenly spaced training images, their true labels and the run's training labels (25% split).
    rows = (pdir / "metadata.tsv").read_text().splitlines()
    assert rows[0].split("\t") == ["index", "label", "true_label", "class", "file_name"]
    table = [r.split("\t") for r in rows[1:]]
    index = np.array([int(r[0]) for r in table])
    np.testing.assert_array_equal(index, projector.evenly_spaced(512, 100))
    true = np.array([int(r[2]) for r in table])
    np.testing.assert_array_equal(true, fmnist_full.train_labels[index])
    label = np.array([int(r[1]) for r in table])
    assert set(label[label >= 0] == true[label >= 0]) == {True} and 0.1 < np.mean(label >= 0) < 0.5

    # Features: the checkpoint's online backbone on those images, L2-normalised.
    from cmsf_tf.data import augment
    from cmsf_tf.eval import encoder

    enc = encoder.from_checkpoint(str(run_2q))
    views = tf.stack([augment.eval_view(tf.constant(im), 28) for im in fmnist_full.train_images[index]])
    want = tf.math.l2_normalize(enc.features(views), -1).numpy()
    np.testing.assert_allclose(np.loadtxt(pdir / "features.tsv", delimiter="\t"), want, atol=1e-5)

    # The projector config TensorBoard reads, the sprite it points at, and the event file that makes a run.
    from google.protobuf import text_format
    from tensorboard.plugins import projector as tb_projector

    cfg = text_format.Parse((pdir / "projector_config.pbtxt").read_text(), tb_projector.ProjectorConfig())
    (emb,) = cfg.embeddings
    assert (emb.tensor_path, emb.metadata_path, emb.sprite.image_path) == ("features.tsv", "metadata.tsv", "sprite.png")
    assert list(emb.sprite.single_image_dim) == [28, 28]
    assert tf.io.decode_png(tf.io.read_file(str(pdir / "sprite.png"))).shape == (280, 280, 3)
    assert "neighbours" in read_events(pdir).Tags()["tensors"]

    # Neighbours: the plain top-k of the target embedding in the bank (NumPy), the query's own rows left out;
    # the constrained set: of the k' rows of M' nearest to the previous view t', the k nearest to t in M.
    result = json.loads((run_2q / "eval" / "projector.json").read_text())
    nb = result["neighbours"]
    queries = np.array(nb["queries"])
    assert nb["method"] == "cmsf_2q" and nb["k"] == 3 and queries.tolist() == [0, 170, 341, 511]
    model, _ = projector.restore_training_model(str(run_2q), enc.info["path"], _source(run_2q), _plan(run_2q))
    q_views = tf.stack([augment.eval_view(tf.constant(im), 28) for im in fmnist_full.train_images[queries]])
    t = model.target_embedding(q_views, training=False).numpy()
    bank = model.bank.embeddings.numpy()
    bank_images = model.bank.image_indices.numpy()
    sims = t @ bank.T
    sims[bank_images[None, :] == queries[:, None]] = -3
    plain = np.argsort(-sims, axis=1, kind="stable")[:, :3]
    assert nb["plain"]["bank_rows"] == plain.tolist()
    assert nb["plain"]["images"] == bank_images[plain].tolist()
    np.testing.assert_allclose(nb["plain"]["similarities"], np.take_along_axis(sims, plain, 1), atol=1e-4)
    t_prev = model.pool.previous(tf.constant(queries), fallback=tf.constant(t)).numpy()
    candidates = np.argsort(-(t_prev @ model.previous_bank.embeddings.numpy().T), axis=1, kind="stable")[:, :6]
    constrained = np.array([c[np.argsort(-sims[b, c], kind="stable")][:3] for b, c in enumerate(candidates)])
    assert nb["constrained"]["bank_rows"] == constrained.tolist()
    purity = np.mean(fmnist_full.train_labels[bank_images[constrained]] == fmnist_full.train_labels[queries][:, None])
    assert nb["constrained"]["purity"] == pytest.approx(purity)

    grid = tf.io.decode_png(tf.io.read_file(str(run_2q / "eval" / "neighbours.png"))).numpy()
    assert grid.shape[0] == 4 * (32 + 8)  # one row per query: a 32 px cell and its padding


def test_projector_of_a_saved_model_and_the_test_split(run_2q, tmp_path):
    export_dir = tmp_path / "export"
    assert run_cli("cmsf_tf.export", f"--model_dir={run_2q}", f"--export_dir={export_dir}").returncode == 0
    out = run_cli("cmsf_tf.evaluate", "projector", f"--saved_model={export_dir}", f"--model_dir={tmp_path / 'sm'}",
                  "--dataset=fashion_mnist", f"--data_dir={json.loads((run_2q / 'flags.json').read_text())['data_dir']}",
                  "--projector_split=test", "--projector_images=50")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "sm" / "eval" / "projector.json").read_text())
    assert result["images"] == 50 and result["split"] == "test" and "neighbours" not in result
    rows = (tmp_path / "sm" / "tensorboard" / "projector" / "metadata.tsv").read_text().splitlines()[1:]
    assert all(r.split("\t")[1] == r.split("\t")[2] for r in rows)  # test split: label = true label


def _source(run_dir):
    from cmsf_tf.data import sources

    return sources.load("fashion_mnist", json.loads((run_dir / "flags.json").read_text())["data_dir"])


def _plan(run_dir):
    from cmsf_tf.data import labels

    return labels.training_labels(_source(run_dir), "percent:25", seed=0, dataset="fashion_mnist")
