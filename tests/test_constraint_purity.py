"""tools/constraint_purity.py: the constraint replayed on a real model's checkpoint layout equals a NumPy
reference (2Q's k' sweep, KM's stored clusters), and a run without a constraint gets one sentence."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import tensorflow as tf

from cmsf_tf.methods import METHODS
from tests.test_train_cli import assert_one_sentence_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BANK, DIM, IMAGES, K = 64, 8, 128, 3


def unit(rng, n):
    x = rng.normal(size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def save_run(run_dir, method, **options):
    """A run directory whose checkpoint is a real model's (tiny backbone), bank filled with random state."""
    keras.utils.set_random_seed(0)
    model = METHODS[method](arch="resnet18_small", image_size=16, width=4, proj_hidden=16, proj_dim=DIM,
                            bank_size=BANK, topk=K, ema_momentum=0.9, weight_decay=1e-4, seed=0, **options)
    rng = np.random.default_rng(1)
    model.bank.embeddings.assign(unit(rng, BANK))
    model.bank.true_labels.assign(rng.integers(0, 4, BANK).astype(np.int32))
    model.bank.image_indices.assign(rng.permutation(IMAGES)[:BANK])
    if method == "cmsf_2q":
        model.previous_bank.embeddings.assign(unit(rng, BANK))
    else:
        model.pool.embeddings.assign(unit(rng, IMAGES))
        model.pool.writes.assign(np.ones(IMAGES, np.int32))
        model.cluster_ids.assign(rng.integers(0, 12, IMAGES).astype(np.int32))
    tf.train.Checkpoint(model=model).save(os.path.join(run_dir, "checkpoints", "ckpt"))
    flags = {"method": method, "topk": K, "topk_prime": options.get("topk_prime", 5), "num_clusters": 12,
             "kmeans_iters": 5, "kmeans_init": "random", "constraint_fill": "nearest"}
    (run_dir / "flags.json").write_text(json.dumps(flags))
    return model


def replay(run_dir, *args):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "constraint_purity.py"),
                          f"--model_dir={run_dir}", f"--out={run_dir / 'report.json'}", *args],
                         capture_output=True, text=True, timeout=300)
    return out, (json.loads((run_dir / "report.json").read_text()) if out.returncode == 0 else None)


def top(sims, k):
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def test_two_queue_sweep_equals_numpy(tmp_path):
    model = save_run(tmp_path, "cmsf_2q", num_images=IMAGES, topk_prime=4)
    out, report = replay(tmp_path, "--k_primes=3,16,64")
    assert out.returncode == 0, out.stderr[-3000:]
    m, mp = model.bank.embeddings.numpy(), model.previous_bank.embeddings.numpy()
    y = model.bank.true_labels.numpy()
    sims = m @ m.T
    pure = lambda idx: np.mean(y[idx] == y[:, None])
    assert abs(report["plain_purity"] - pure(top(sims, K))) < 1e-9
    assert [r["k_prime"] for r in report["rows"]] == [3, 4, 16, 64]
    assert [r["run_setting"] for r in report["rows"]] == [False, True, False, False]
    for r in report["rows"]:
        candidates = top(mp @ mp.T, r["k_prime"])
        chosen = np.take_along_axis(candidates, top(np.take_along_axis(sims, candidates, 1), K), 1)
        assert abs(r["purity"] - pure(chosen)) < 1e-9
        assert abs(r["candidate_purity"] - pure(candidates)) < 1e-9
    # k' = the whole bank constrains nothing: the plain top-k.
    assert abs(report["rows"][-1]["purity"] - report["plain_purity"]) < 1e-9
    assert "| 4 (the run's) |" in out.stdout


def test_cluster_constraint_equals_numpy_and_one_cluster_constrains_nothing(tmp_path):
    model = save_run(tmp_path, "cmsf_km", num_images=IMAGES)
    out, report = replay(tmp_path, "--clusters=1,8")
    assert out.returncode == 0, out.stderr[-3000:]
    m, y = model.bank.embeddings.numpy(), model.bank.true_labels.numpy()
    sims = m @ m.T
    rows = model.cluster_ids.numpy()[model.bank.image_indices.numpy()]
    same = rows[:, None] == rows[None, :]
    chosen = top(np.where(same, sims, sims - 4.0), K)  # short sets filled with the nearest other rows
    own = report["rows"][0]
    assert own["run_setting"] and own["clusters"] == 12
    assert abs(own["purity"] - np.mean(y[chosen] == y[:, None])) < 1e-9
    assert abs(own["bank_rows_per_cluster"] - same.sum(1).mean()) < 1e-9
    assert abs(own["short_sets"] - np.mean(same.sum(1) < K)) < 1e-9
    one = report["rows"][1]
    assert one["clusters"] == 1 and abs(one["purity"] - report["plain_purity"]) < 1e-9
    assert one["bank_rows_per_cluster"] == BANK and report["rows"][2]["clusters"] == 8


def test_a_run_without_a_constraint_is_refused_in_one_sentence(tmp_path):
    save_run(tmp_path, "cmsf_2q", num_images=IMAGES)
    flags = json.loads((tmp_path / "flags.json").read_text())
    (tmp_path / "flags.json").write_text(json.dumps(dict(flags, method="msf")))
    out, _ = replay(tmp_path)
    assert_one_sentence_error(out, "has no constraint to replay")
    out, _ = replay(tmp_path / "missing")
    assert_one_sentence_error(out, "is not a training run")
    assert "--saved_model" not in out.stderr  # the tool has no such flag
