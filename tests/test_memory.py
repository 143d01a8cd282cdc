"""Memory bank: ring order, alignment, visibility of the batch to its own search, replica equality."""

import numpy as np
import tensorflow as tf

from cmsf_tf import ops
from cmsf_tf.memory import MemoryBank
from tests.conftest import REPO


def test_initial_rows_are_unit_and_labels_empty():
    bank = MemoryBank(16, 4, seed=1)
    np.testing.assert_allclose(np.linalg.norm(bank.embeddings.numpy(), axis=1), 1.0, rtol=1e-5)
    assert (bank.labels.numpy() == -1).all() and (bank.image_indices.numpy() == -1).all()
    assert int(bank.pointer.numpy()) == 0


def test_ring_order_over_wrap_around_keeps_rows_aligned():
    bank = MemoryBank(8, 2)
    for step in range(5):  # 5 batches of 3 rows into 8 slots: wraps twice
        ids = np.arange(3 * step, 3 * step + 3)
        emb = np.stack([ids, -ids], axis=1).astype(np.float32)
        positions = bank.write(emb, ids % 4, ids % 5, ids).numpy()
        np.testing.assert_array_equal(positions, (3 * step + np.arange(3)) % 8)
    ids = bank.image_indices.numpy()
    # Row j holds the newest id written to it: 15 rows written, row j last got the largest id = j mod 8.
    want = np.array([max(i for i in range(15) if i % 8 == j) for j in range(8)])
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_array_equal(bank.embeddings.numpy()[:, 0], want)
    np.testing.assert_array_equal(bank.embeddings.numpy()[:, 1], -want)
    np.testing.assert_array_equal(bank.labels.numpy(), want % 4)
    np.testing.assert_array_equal(bank.true_labels.numpy(), want % 5)
    assert int(bank.pointer.numpy()) == 15 % 8


def test_batch_is_visible_to_its_own_search_in_a_tf_function():
    bank = MemoryBank(32, 8, seed=3)

    @tf.function
    def step(t):
        bank.write(t, tf.zeros(4, tf.int32), tf.zeros(4, tf.int32), tf.range(4, dtype=tf.int64))
        return ops.nearest_neighbours(t, tf.convert_to_tensor(bank.embeddings), 1)

    for i in range(10):  # also over the wrap-around
        t = tf.math.l2_normalize(tf.random.normal([4, 8], seed=i), axis=1)
        ptr = (4 * i) % 32
        np.testing.assert_array_equal(step(t).numpy()[:, 0], ptr + np.arange(4))


def test_two_replicas_write_identical_complete_banks(tmp_path):
    """With 2 logical CPU devices each replica writes the rows of both replicas, in replica order."""
    script = tmp_path / "two_replicas.py"
    script.write_text(f"""
import sys; sys.path.insert(0, {REPO!r})
import numpy as np, tensorflow as tf
from cmsf_tf import distribute
distribute.configure_cpu_devices(2)
from cmsf_tf.memory import MemoryBank
strategy = distribute.make_strategy("mirrored", 2)
with strategy.scope():
    bank = MemoryBank(12, 2)

@tf.function
def step(x):
    def fn(x):
        rows = distribute.gather(x, tf.cast(x[:, 0], tf.int32), tf.cast(x[:, 0], tf.int32), tf.cast(x[:, 0], tf.int64))
        bank.write(*rows)
    strategy.run(fn, args=(x,))

data = tf.data.Dataset.range(24).map(lambda i: tf.stack([tf.cast(i, tf.float32)] * 2)).batch(4)
for batch in strategy.experimental_distribute_dataset(data):
    step(batch)
copies = [v.numpy() for v in bank.embeddings.value.values]
ids = [v.numpy() for v in bank.image_indices.value.values]
assert np.array_equal(copies[0], copies[1]), copies
assert np.array_equal(ids[0], ids[1])
np.testing.assert_array_equal(ids[0], np.arange(12, 24))
print("OK")
""")
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
