"""The accelerator path on CPU: every method's train step, the epoch-end k-means, the pseudo-label head's
rounds and the k-NN features compile with XLA (the compiler TPUStrategy and jit_compile use) and compute
what they compute without it; the --jit_compile settings that cannot compile are refused in one sentence.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from cmsf_tf import clustering, config, distribute, train
from cmsf_tf.callbacks.pseudo_label import train_head
from cmsf_tf.models import heads

SIZE, BATCH, IMAGES, CLASSES, CLUSTERS = 16, 16, 64, 4, 4
METHOD_NAMES = ("byol", "msf", "cmsf_2q", "cmsf_km", "cmsf_sup", "cmsf_pseudo", "xent")

# float32, XLA vs not, each step from the same state (the second from the uncompiled model's state after the
# first: momentum under way, target no longer a copy): XLA fuses and reorders reductions (a wrong step is
# O(1) off). Free-running, the two part by far more in this tiny network, as any two float32 runs whose
# weights differ by round-off do (tools/parity.py measures it: ~1e-6 grows to ~1e-3 within three steps),
# so the second step is not compared from the first's diverged weights.
LOSS_RTOL, UPDATE_RTOL, BANK_ATOL = 1e-4, 2e-2, 1e-4
# bfloat16 (8 bits of mantissa): XLA keeps fused intermediates in float32 where the kernels round each op's
# output, so the two bfloat16 steps differ about as much as either differs from float32 (measured: weights
# 2.5% of their norm apart, and 2.5% (plain) / 2.2% (XLA) from float32). The XLA step must stay as close to
# the float32 step as the uncompiled bfloat16 step is (within a factor 2).
def run_config(method):
    return config.make(method=method, arch="resnet18_small", width=4, image_size=SIZE, batch_size=BATCH,
                       bank_size=4 * BATCH, topk=1 if method == "byol" else 3, topk_prime=4, proj_hidden=32,
                       proj_dim=16, num_clusters=CLUSTERS, labelled_cache_size=4 * BATCH, conf_threshold=0.3,
                       label_split="percent:50" if method == "cmsf_pseudo" else "")


def uint8_batch(views=("weak", "strong", "third")):
    """A batch as the pipeline yields it: uint8 views, labels (a quarter unlabelled), image indices."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, CLASSES, BATCH).astype(np.int32)
    labels[::4] = -1
    batch = {view: rng.integers(0, 256, (BATCH, SIZE, SIZE, 3), dtype=np.uint8) for view in views}
    batch.update(label=labels, true_label=np.abs(labels), is_labelled=labels >= 0,
                 index=rng.choice(IMAGES, BATCH, replace=False).astype(np.int64))
    return batch


def trained(method, jit_compile, precision, batch, steps=2):
    """(loss per step, online weights, bank or None, initial online weights) of `steps` fit() steps on
    `batch` from fixed weights."""
    keras.mixed_precision.set_global_policy("float32" if precision == "float32" else f"mixed_{precision}")
    try:
        keras.utils.set_random_seed(0)
        model = train.build_model(run_config(method), sync_bn=False, num_images=IMAGES, num_classes=CLASSES)
        initial = [v.numpy() for v in model.online_variables]
        model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), jit_compile=jit_compile)
        assert model.jit_compile == jit_compile
        if method == "cmsf_km":  # clusters as after the first epoch end, so the constraint is on
            model.cluster_ids.assign(np.arange(IMAGES, dtype=np.int32) % CLUSTERS)
        history = model.fit(tf.data.Dataset.from_tensors(batch).repeat(steps), epochs=steps, steps_per_epoch=1,
                            verbose=0).history
        bank = getattr(model, "bank", None)
        return (np.array(history["loss"]), [v.numpy() for v in model.online_variables],
                None if bank is None else bank.embeddings.numpy(), initial)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def distance(weights, reference, scale):
    """||weights - reference|| / ||scale|| over all the variables at once."""
    squares = lambda pairs: sum(float(np.sum((a - b) ** 2)) for a, b in pairs)  # noqa: E731
    return np.sqrt(squares(zip(weights, reference)) / squares(zip(scale, [np.zeros_like(s) for s in scale])))


def built(method, jit_compile):
    """The float32 model of `method`, compiled (XLA or not) and in the state fit() would start from."""
    keras.utils.set_random_seed(0)
    model = train.build_model(run_config(method), sync_bn=False, num_images=IMAGES, num_classes=CLASSES)
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), jit_compile=jit_compile)
    assert model.jit_compile == jit_compile
    if method == "cmsf_km":  # clusters as after the first epoch end, so the constraint is on
        model.cluster_ids.assign(np.arange(IMAGES, dtype=np.int32) % CLUSTERS)
    return model


def one_step(model, batch):
    return model.fit(tf.data.Dataset.from_tensors(batch), epochs=1, steps_per_epoch=1, verbose=0).history["loss"][0]


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_every_method_trains_under_xla_as_without_it_in_float32_and_bfloat16(method):
    from cmsf_tf.methods import METHODS

    wanted = METHODS[method].views(run_config(method))
    batch = uint8_batch(["weak"] + [v for v, key in (("strong", "strong_view"), ("third", "third_view")) if wanted[key]])
    plain, xla = built(method, False), built(method, True)
    for a, b in zip(xla.weights, plain.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())  # the same start
    for step in range(2):
        if step:  # the second step from the same state too: the uncompiled model's, optimizer included
            for a, b in zip(xla.weights + xla.optimizer.variables, plain.weights + plain.optimizer.variables):
                a.assign(b)
        before = [v.numpy() for v in plain.online_variables]
        loss, xla_loss = one_step(plain, batch), one_step(xla, batch)
        np.testing.assert_allclose(xla_loss, loss, rtol=LOSS_RTOL)
        weights = [v.numpy() for v in plain.online_variables]
        update = [w - w0 for w, w0 in zip(weights, before)]
        assert distance([v.numpy() for v in xla.online_variables], weights, update) < UPDATE_RTOL, step
        if hasattr(plain, "bank"):
            np.testing.assert_allclose(xla.bank.embeddings.numpy(), plain.bank.embeddings.numpy(), atol=BANK_ATOL)
    loss, weights, _, _ = trained(method, False, "float32", batch)

    bf16_loss, bf16_weights, _, _ = trained(method, False, "bfloat16", batch)
    bf16_xla_loss, bf16_xla_weights, _, _ = trained(method, True, "bfloat16", batch)
    assert np.all(np.isfinite(bf16_xla_loss))
    np.testing.assert_allclose(bf16_xla_loss, loss, rtol=0.15)  # measured <= 4%; plain bfloat16 <= 8%
    plain_off = distance(bf16_weights, weights, weights)
    assert distance(bf16_xla_weights, weights, weights) < 2 * plain_off + 1e-3, plain_off


@pytest.mark.parametrize("method", ["msf", "cmsf_2q", "cmsf_pseudo"])
def test_multi_crop_steps_compile_with_xla_and_run_in_bfloat16(method):
    """--multi_crop's small crops ([B, n, s, s, 3] uint8) through one train step: under XLA the same loss and
    update as without it, finite in bfloat16, and the crops do pull (the step differs from one without them)."""
    rng = np.random.default_rng(1)
    batch = uint8_batch(["weak", "strong"])
    batch["small"] = rng.integers(0, 256, (BATCH, 2, SIZE // 2, SIZE // 2, 3), dtype=np.uint8)
    plain, xla, without = built(method, False), built(method, True), built(method, False)
    before = [v.numpy() for v in plain.online_variables]
    loss, xla_loss = one_step(plain, batch), one_step(xla, batch)
    np.testing.assert_allclose(xla_loss, loss, rtol=LOSS_RTOL)
    weights = [v.numpy() for v in plain.online_variables]
    update = [w - w0 for w, w0 in zip(weights, before)]
    assert distance([v.numpy() for v in xla.online_variables], weights, update) < UPDATE_RTOL
    one_step(without, {k: v for k, v in batch.items() if k != "small"})
    assert distance([v.numpy() for v in without.online_variables], weights, update) > 0.05
    bf16_loss, _, _, _ = trained(method, True, "bfloat16", batch, steps=1)
    assert np.all(np.isfinite(bf16_loss))
    np.testing.assert_allclose(bf16_loss, [loss], rtol=0.15)


def test_kmeans_compiles_with_xla_and_clusters_as_without_it():
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(6, 8))
    x = centres[rng.integers(0, 6, 500)] + 0.3 * rng.normal(size=(500, 8))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    for init in ("random", "kmeans++"):
        for empty in ("split", "farthest"):
            # chunk 128 does not divide 500: the last block overlaps its predecessor.
            args = dict(iters=6, seed=2, init=init, chunk=128, empty=empty)
            centroids, assignments, inertia = clustering.spherical_kmeans(x, 6, **args)
            xla = clustering.spherical_kmeans(x, 6, jit_compile=True, **args)
            np.testing.assert_array_equal(xla[1].numpy(), assignments.numpy())
            np.testing.assert_allclose(xla[0].numpy(), centroids.numpy(), atol=1e-5)
            np.testing.assert_allclose(float(xla[2]), float(inertia), rtol=1e-5)
            # and both are right: every point is assigned to its most similar centroid
            np.testing.assert_array_equal(assignments.numpy(), np.argmax(x @ centroids.numpy().T, axis=1))


def test_pseudo_label_head_rounds_compile_with_xla_and_train_as_without_them():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 3, 90).astype(np.int32)
    features = (np.eye(3, 8)[labels] + 0.2 * rng.normal(size=(90, 8))).astype(np.float32)
    results = []
    for jit_compile in (False, True):
        keras.utils.set_random_seed(0)
        head = heads.mlp(8, 16, 3, False, "head")
        accuracy = train_head(head, features, labels, epochs=3, lr=0.05, batch_size=32, seed=1,
                              jit_compile=jit_compile)  # 90 rows: batches of 32, 32 and 26 (two shapes)
        results.append((accuracy, [w.copy() for w in head.get_weights()]))
    (accuracy, weights), (xla_accuracy, xla_weights) = results
    assert xla_accuracy == accuracy
    for a, b in zip(xla_weights, weights):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_knn_features_compile_with_xla_and_equal_the_uncompiled_ones(fmnist_slice):
    from cmsf_tf.callbacks import monitor
    from cmsf_tf.data import pipeline, sources
    from cmsf_tf.eval import knn

    keras.utils.set_random_seed(0)
    model = train.build_model(config.make(method="msf", arch="resnet18_small", width=4, image_size=28,
                                          batch_size=32, bank_size=64), sync_bn=False, num_images=512, num_classes=10)
    source = sources.load("fashion_mnist", fmnist_slice)
    feats = {}
    for jit_compile in (False, True):
        fn = monitor.feature_function(model.online_backbone, model.distribute_strategy, jit_compile)
        # batch 100 over 256 test images: the last batch is short (a second compilation)
        feats[jit_compile] = knn.features_and_labels(fn, pipeline.eval_split(source, "test", 28, 100))
    np.testing.assert_array_equal(feats[True][1], feats[False][1])
    np.testing.assert_allclose(feats[True][0], feats[False][0], atol=1e-5)


def test_jit_compile_settings_that_cannot_compile_are_refused_in_one_sentence():
    for kwargs, words in [
        (dict(strategy="mirrored", cpu_devices=2, jit_compile="true"), "cannot compile under --strategy=mirrored"),
        (dict(strategy="multi_worker", jit_compile="true"), "cannot compile under --strategy=multi_worker"),
        (dict(deterministic=True, jit_compile="true"), "cannot be combined with --deterministic"),
        (dict(strategy="tpu", jit_compile="false"), "TPUStrategy compiles every step with XLA"),
        (dict(jit_compile="yes"), "unknown --jit_compile 'yes'"),
    ]:
        with pytest.raises(config.UsageError, match=words) as e:
            config.make(**kwargs)
        assert "\n" not in str(e.value)
    for kwargs in [dict(jit_compile="true"), dict(strategy="mirrored", cpu_devices=2), dict(deterministic=True),
                   dict(strategy="tpu")]:
        config.make(**kwargs)  # accepted


def test_deterministic_runs_are_flagged_where_the_cpu_kernels_cannot_keep_them():
    """oneDNN's kernels on an x86 CPU without AVX-512 broke --deterministic (docs/resume.md); with AVX-512, or
    on TensorFlow's Eigen kernels, runs agree bit for bit. A machine whose flags are unknown is not flagged."""
    avx2, avx512 = {"sse4_2", "avx", "avx2", "fma"}, {"avx2", "avx512f", "avx512_vnni"}
    assert distribute.nondeterministic_cpu_kernels(True, avx2) is True
    assert distribute.nondeterministic_cpu_kernels(True, avx512) is False
    assert distribute.nondeterministic_cpu_kernels(False, avx2) is False
    assert distribute.nondeterministic_cpu_kernels(True, None) is False
    flags = distribute.cpu_flags()
    assert flags is None or "sse2" in flags  # x86 Linux: a set of flag names (other machines: None)
    assert isinstance(distribute.onednn_on(), bool)


def test_runs_on_eigen_kernels_of_an_x86_cpu_are_told_of_onednn_unless_the_user_chose():
    """TF_ENABLE_ONEDNN_OPTS=1 doubled training speed on a CPU where TensorFlow leaves it off (docs/resume.md):
    say so once, but not where oneDNN already runs, off x86, or where the user set the variable either way."""
    avx2, avx512 = {"sse4_2", "avx", "avx2", "fma"}, {"avx2", "avx512f"}
    note = distribute.eigen_kernels_hint(False, avx2, None)
    assert note.startswith("note: ") and "TF_ENABLE_ONEDNN_OPTS=1" in note and "\n" not in note
    assert "--deterministic" in note  # without AVX-512 it costs bit-exact runs ...
    assert "--deterministic" not in distribute.eigen_kernels_hint(False, avx512, "")  # ... with it, not
    assert distribute.eigen_kernels_hint(True, avx2, None) is None
    assert distribute.eigen_kernels_hint(True, avx2, "1") is None
    assert distribute.eigen_kernels_hint(False, avx2, "0") is None
    assert distribute.eigen_kernels_hint(False, None, None) is None


def test_auto_compiles_under_tpu_and_on_one_gpu_only():
    gpu = bool(tf.config.list_logical_devices("GPU"))
    assert distribute.resolve_jit_compile("auto", "tpu") is True
    assert distribute.resolve_jit_compile("auto", "default") is gpu
    assert distribute.resolve_jit_compile("auto", "default", deterministic=True) is False
    assert distribute.resolve_jit_compile("auto", "mirrored") is False
    assert distribute.resolve_jit_compile("auto", "multi_worker") is False
    assert distribute.resolve_jit_compile("true", "default") is True
    assert distribute.resolve_jit_compile("false", "default") is False


def test_the_compiled_step_trains_on_bfloat16_pixel_levels_as_on_uint8():
    """TPUs take the views as bfloat16 pixel levels (distribute.view_dtype): the compiled step must not see
    the difference."""
    batch = uint8_batch(["weak", "strong"])
    levels = dict(batch, weak=tf.cast(batch["weak"], tf.bfloat16), strong=tf.cast(batch["strong"], tf.bfloat16))
    loss, weights, bank, _ = trained("cmsf_km", True, "float32", batch)
    tpu_loss, tpu_weights, tpu_bank, _ = trained("cmsf_km", True, "float32", levels)
    np.testing.assert_array_equal(tpu_loss, loss)
    np.testing.assert_array_equal(tpu_bank, bank)
    for a, b in zip(tpu_weights, weights):
        np.testing.assert_array_equal(a, b)
