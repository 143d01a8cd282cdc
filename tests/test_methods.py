"""MeanShift train step on a tiny model: EMA, no gradient to the target, learning, BYOL = MSF(k=1)."""

import keras
import numpy as np
import tensorflow as tf

from cmsf_tf.data import pipeline, sources
from cmsf_tf.methods import METHODS

SIZE, BATCH = 16, 16


def tiny(method="msf", topk=3, ema=0.9, wd=1e-4, seed=0, bank=64):
    keras.utils.set_random_seed(seed)
    model = METHODS[method](arch="resnet18_small", image_size=SIZE, width=4, proj_hidden=32, proj_dim=16,
                            bank_size=bank, topk=topk, ema_momentum=ema, weight_decay=wd, seed=seed)
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
    return model


def fixed_batch():
    rng = np.random.default_rng(0)
    src = sources.InMemorySource("random", rng.integers(0, 255, (BATCH, SIZE, SIZE, 3), np.uint8),
                                 rng.integers(0, 4, BATCH).astype(np.int32), None, None, 4)
    ds = pipeline.train_dataset(src, global_batch=BATCH, image_size=SIZE, seed=0, steps_per_epoch=1,
                                start_epoch=0, end_epoch=1)
    return next(iter(ds))


def fit_steps(model, batch, steps):
    ds = tf.data.Dataset.from_tensors(batch).repeat(steps)
    return model.fit(ds, epochs=steps, steps_per_epoch=1, verbose=0).history


def test_every_method_name_in_config_is_registered():
    from cmsf_tf import config

    assert set(config._METHODS) == set(METHODS)


def test_target_starts_as_copy_and_moves_by_ema_only():
    m = 0.9
    model = tiny(ema=m)
    for t, o in model._ema_pairs():
        np.testing.assert_array_equal(t.numpy(), o.numpy())
    batch = fixed_batch()
    fit_steps(model, batch, 1)
    before = [t.numpy() for t, _ in model._ema_pairs()]
    fit_steps(model, batch, 1)
    for (t, o), t0 in zip(model._ema_pairs(), before):
        np.testing.assert_allclose(t.numpy(), m * t0 + (1 - m) * o.numpy(), rtol=1e-5, atol=1e-6)


def test_optimizer_holds_no_state_for_the_target():
    model = tiny()
    fit_steps(model, fixed_batch(), 1)
    assert len(model.trainable_variables) > len(model.online_variables)  # target weights are "trainable"
    assert len(model.optimizer.momentums) == len(model.online_variables)


def test_no_gradient_reaches_the_target():
    model = tiny()
    batch = fixed_batch()
    with tf.GradientTape() as tape:
        t = model.target_embedding(batch["weak"])
        q = model.online_prediction(batch["strong"])
        loss = tf.reduce_sum(t * q)
    grads = tape.gradient(loss, model.target_backbone.trainable_variables)
    assert all(g is None for g in grads)


def test_loss_decreases_on_a_fixed_batch():
    model = tiny()
    history = fit_steps(model, fixed_batch(), 40)["loss"]
    assert np.mean(history[-5:]) < 0.7 * np.mean(history[:5]), history


def test_byol_equals_msf_with_k1():
    batch = fixed_batch()
    byol, msf = tiny("byol", topk=5), tiny("msf", topk=1)
    h_byol, h_msf = fit_steps(byol, batch, 3), fit_steps(msf, batch, 3)
    np.testing.assert_allclose(h_byol["loss"], h_msf["loss"], rtol=1e-5)
    for a, b in zip(byol.online_variables, msf.online_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-6)
    # k = 1 finds the target itself (the batch is in the bank): purity is exactly 1.
    assert h_byol["purity"][-1] == 1.0


def test_bank_holds_the_targets_after_a_step():
    model = tiny()
    batch = fixed_batch()
    fit_steps(model, batch, 1)
    t = model.target_embedding(batch["weak"])  # the target moved by EMA; compare ids and labels exactly
    np.testing.assert_array_equal(model.bank.image_indices.numpy()[:BATCH], batch["index"].numpy())
    np.testing.assert_array_equal(model.bank.true_labels.numpy()[:BATCH], batch["true_label"].numpy())
    assert int(model.bank.pointer.numpy()) == BATCH
    np.testing.assert_allclose(np.linalg.norm(model.bank.embeddings.numpy()[:BATCH], axis=1), 1.0, rtol=1e-5)
    assert t.shape == (BATCH, 16)


def labelled_batch(labels):
    batch = dict(fixed_batch())
    batch["label"] = tf.constant(labels, tf.int32)
    return batch


def test_cmsf_sup_with_a_single_label_is_msf():
    # A bank of one batch holds only this batch's rows, all with label 0: the constraint allows all.
    batch = labelled_batch(np.zeros(BATCH, np.int32))
    sup, msf = tiny("cmsf_sup", topk=3, bank=BATCH), tiny("msf", topk=3, bank=BATCH)
    h_sup, h_msf = fit_steps(sup, batch, 3), fit_steps(msf, batch, 3)
    np.testing.assert_allclose(h_sup["loss"], h_msf["loss"], rtol=1e-5)
    for a, b in zip(sup.online_variables, msf.online_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-6)


def test_cmsf_sup_neighbours_all_share_the_training_label():
    labels = np.arange(BATCH) % 4  # 4 rows of each label per batch >= k = 3
    sup = tiny("cmsf_sup", topk=3)
    history = fit_steps(sup, labelled_batch(labels), 4)
    assert history["label_purity"] == [1.0] * 4
    msf = tiny("msf", topk=3)
    assert np.mean(fit_steps(msf, labelled_batch(labels), 4)["label_purity"]) < 0.9  # unconstrained


def test_training_labels_apply_noise_then_split(fmnist_slice):
    from cmsf_tf import train
    from cmsf_tf.config import Config

    src = sources.load_fashion_mnist(fmnist_slice)
    fields = {f: None for f in Config.__dataclass_fields__}
    cfg = Config(**{**fields, "label_noise": 25.0, "label_split": "percent:10", "seed": 0})
    labels = train.training_labels(cfg, src).labels
    labelled = labels >= 0
    assert labelled.sum() == round(0.1 * src.num_train)
    assert (labels[~labelled] == -1).all()
    noisy = labels[labelled] != src.train_labels[labelled]
    assert 0 < noisy.mean() < 0.6  # about a quarter of the kept labels are wrong
