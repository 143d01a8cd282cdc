"""tools/compare_checkpoints.py: identical runs pass, a changed variable or a missing one fails."""

import os
import subprocess
import sys

import numpy as np
import tensorflow as tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def save(run_dir, **values):
    checkpoint = tf.train.Checkpoint(**{k: tf.Variable(v) for k, v in values.items()})
    checkpoint.save(os.path.join(run_dir, "checkpoints", "ckpt"))


def compare(a, b):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "compare_checkpoints.py"), str(a), str(b)],
                          capture_output=True, text=True, timeout=120)


def test_compare_checkpoints(tmp_path):
    weights = np.arange(6, dtype=np.float32).reshape(2, 3)
    save(tmp_path / "a", w=weights, bank=np.ones(4, np.float32))
    save(tmp_path / "b", w=weights, bank=np.ones(4, np.float32))
    changed = weights.copy()
    changed[1, 2] = np.nextafter(changed[1, 2], np.float32(10))  # one bit of one weight
    save(tmp_path / "c", w=changed, bank=np.ones(4, np.float32))
    save(tmp_path / "d", w=weights)
    out = compare(tmp_path / "a", tmp_path / "b")
    assert out.returncode == 0 and "identical" in out.stdout, out.stdout + out.stderr
    out = compare(tmp_path / "a", tmp_path / "c")
    assert out.returncode == 1 and "differs: w/" in out.stdout, out.stdout + out.stderr
    out = compare(tmp_path / "a", tmp_path / "d")
    assert out.returncode == 1 and "only in A: bank/" in out.stdout, out.stdout + out.stderr
    out = compare(tmp_path / "a", tmp_path / "missing")
    assert out.returncode == 1 and "has no checkpoint" in out.stderr
