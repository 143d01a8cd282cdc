"""MeanShift train step on a tiny model: EMA, no gradient to the target, learning, BYOL = MSF(k=1)."""

import keras
import numpy as np
import tensorflow as tf

from cmsf_tf.data import augment, pipeline, sources
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
        t = model.target_embedding(augment.to_model_input(batch["weak"]))
        q = model.online_prediction(augment.to_model_input(batch["strong"]))
        loss = tf.reduce_sum(t * q)
    grads = tape.gradient(loss, model.target_backbone.trainable_variables)
    assert all(g is None for g in grads)


def test_loss_decreases_on_a_fixed_batch():
    model = tiny()
    history = fit_steps(model, fixed_batch(), 40)["loss"]
    assert np.mean(history[-5:]) < 0.7 * np.mean(history[:5]), history


def test_multi_crop_logs_the_loss_of_each_kind_of_view_and_their_mean_over_views():
    """--multi_crop: `loss` is the mean over the 1 + n query views; loss_strong and loss_small (the small
    crops' mean) are logged beside it, and only where small crops come in."""
    rng = np.random.default_rng(0)
    src = sources.InMemorySource("random", rng.integers(0, 255, (BATCH, SIZE, SIZE, 3), np.uint8),
                                 rng.integers(0, 4, BATCH).astype(np.int32), None, None, 4)
    n = 3
    ds = pipeline.train_dataset(src, global_batch=BATCH, image_size=SIZE, seed=0, steps_per_epoch=1,
                                start_epoch=0, end_epoch=1, multi_crop=(n, 8, 0.05, 0.14))
    history = fit_steps(tiny("cmsf_sup"), next(iter(ds)), 1)
    strong, small = history["loss_strong"][0], history["loss_small"][0]
    assert strong != small
    np.testing.assert_allclose(history["loss"][0], (strong + n * small) / (1 + n), rtol=1e-5)
    plain = fit_steps(tiny("cmsf_sup"), fixed_batch(), 1)
    assert "loss_strong" not in plain and "loss_small" not in plain and "loss" in plain


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
    t = model.target_embedding(augment.to_model_input(batch["weak"]))  # the target moved by EMA; compare ids and labels exactly
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


def tiny_pool_model(method, num_images, **kw):
    keras.utils.set_random_seed(0)
    options = dict(num_images=num_images, **kw)
    model = METHODS[method](arch="resnet18_small", image_size=SIZE, width=4, proj_hidden=32, proj_dim=16,
                            bank_size=16, topk=2, ema_momentum=0.9, weight_decay=1e-4, seed=0, **options)
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
    return model


def epoch_stream(n, epoch, batch=8, third_view=False):
    rng = np.random.default_rng(1)
    src = sources.InMemorySource("random", rng.integers(0, 255, (n, SIZE, SIZE, 3), np.uint8),
                                 rng.integers(0, 4, n).astype(np.int32), None, None, 4)
    return pipeline.train_dataset(src, global_batch=batch, image_size=SIZE, seed=0, steps_per_epoch=n // batch,
                                  start_epoch=epoch, end_epoch=epoch + 1, third_view=third_view)


def test_cmsf_2q_pool_holds_the_previous_epochs_view_of_each_image():
    n = 16
    model = tiny_pool_model("cmsf_2q", n, topk_prime=3)
    latest = []
    for epoch in range(3):
        history = model.fit(epoch_stream(n, epoch), epochs=1, steps_per_epoch=2, verbose=0).history
        assert np.isfinite(history["loss"][0]) and "constrained_rank" in history
        embeddings, seen = model.pool.latest()
        assert seen.numpy().all() and (model.pool.writes.numpy() == epoch + 1).all()
        current = embeddings.numpy()
        previous = model.pool.previous(np.arange(n), fallback=np.full((n, 16), 7.0, np.float32)).numpy()
        if epoch == 0:
            np.testing.assert_array_equal(previous, 7.0)  # no previous view yet: the fallback (t itself)
        else:
            np.testing.assert_allclose(previous, latest[-1], atol=1e-6)  # t' = last epoch's t, same image
            # M' row = previous view of that row's image, written with the row.
            ids = model.bank.image_indices.numpy()
            np.testing.assert_allclose(model.previous_bank.embeddings.numpy(), latest[-1][ids], atol=1e-6)
            np.testing.assert_allclose(model.bank.embeddings.numpy(), current[ids], atol=1e-6)
        latest.append(current)
    assert not np.allclose(latest[1], latest[2])


def test_cmsf_2q_third_view_variant_searches_a_bank_of_third_views():
    """M' holds the third views (not the weak views of M), and the constrained neighbours are the k rows
    of M most similar to t among the top-k' of the third view t' in M' (NumPy reference)."""
    model = tiny_pool_model("cmsf_2q", 16, topk_prime=4, third_view=True)
    stream = iter(epoch_stream(16, 0, third_view=True))
    batches = [next(stream), next(stream)]
    for batch in batches:  # fill both banks (16 rows = 2 batches of 8)
        third = model.target_embedding(augment.to_model_input(batch["third"])).numpy()  # what the step computes, before its EMA
        weak = model.target_embedding(augment.to_model_input(batch["weak"])).numpy()
        history = model.fit(tf.data.Dataset.from_tensors(batch), epochs=1, steps_per_epoch=1, verbose=0).history
        start = (int(model.bank.pointer.numpy()) - 8) % 16  # the ring wraps after the second batch
        np.testing.assert_allclose(model.previous_bank.embeddings.numpy()[start:start + 8], third, atol=1e-5)
        np.testing.assert_allclose(model.bank.embeddings.numpy()[start:start + 8], weak, atol=1e-5)
        assert not np.allclose(third, weak, atol=1e-3)  # the two views differ, so the test tells them apart
    assert model.pool is None and np.isfinite(history["loss"][0])
    batch = dict(batches[0])
    targets = model.target_embedding(augment.to_model_input(batch["weak"]))
    batch["third_target"] = model.target_embedding(augment.to_model_input(batch["third"]))
    bank, prev_bank = model.bank.embeddings.numpy(), model.previous_bank.embeddings.numpy()
    sims = targets.numpy() @ bank.T
    constrained, _ = model.neighbour_sets(batch, targets, tf.constant(sims))
    t_prime = batch["third_target"].numpy()
    for b in range(len(sims)):
        candidates = np.argsort(-(t_prime[b] @ prev_bank.T), kind="stable")[:4]
        want = candidates[np.argsort(-sims[b, candidates], kind="stable")[:2]]
        np.testing.assert_array_equal(constrained[1].numpy()[b], want)


def test_cmsf_km_constraint_follows_the_current_cluster_ids():
    n = 16
    model = tiny_pool_model("cmsf_km", n)
    batch = next(iter(epoch_stream(n, 0)))
    targets = model.target_embedding(augment.to_model_input(batch["weak"]))
    # No clusters yet: the constrained set is the unconstrained one (loss = MSF).
    sims = tf.random.normal([8, 16])
    first, second = model.neighbour_sets(batch, targets, sims)
    np.testing.assert_array_equal(first[1].numpy(), second[1].numpy())
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 3, n).astype(np.int32)
    model.cluster_ids.assign(ids)
    bank_images = rng.integers(-1, n, 16)  # -1: an empty bank row
    model.bank.image_indices.assign(bank_images)
    constrained = model.neighbour_sets(batch, targets, sims)[0][1].numpy()
    query = ids[batch["index"].numpy()]
    bank_ids = np.where(bank_images >= 0, ids[np.maximum(bank_images, 0)], -1)
    allowed = query[:, None] == bank_ids[None, :]
    penalised = np.where(allowed, sims.numpy(), sims.numpy() - 4.0)
    np.testing.assert_array_equal(constrained, np.argsort(-penalised, axis=1, kind="stable")[:, :2])


def test_kmeans_callback_clusters_the_pool_at_epoch_end():
    from cmsf_tf.callbacks.kmeans import KMeansClusters

    n = 16
    model = tiny_pool_model("cmsf_km", n)
    messages = []
    history = model.fit(epoch_stream(n, 0), epochs=1, steps_per_epoch=2, verbose=0,
                        callbacks=[KMeansClusters(3, iters=5, log=messages.append)]).history
    assert "constraint is off" in messages[0]
    ids = model.cluster_ids.numpy()
    assert ids.min() >= 0 and len(np.unique(ids)) == 3
    embeddings, _ = model.pool.latest()
    from cmsf_tf import clustering
    _, want, _ = clustering.spherical_kmeans(embeddings.numpy(), 3, iters=5, seed=0)
    np.testing.assert_array_equal(ids, want.numpy())
    assert 0 <= history["kmeans_inertia"][0] <= 2


def test_cmsf_sup_neighbours_equal_a_numpy_reference_with_noisy_labels():
    from cmsf_tf.data import splits

    rng = np.random.default_rng(7)
    true = rng.integers(0, 3, 64).astype(np.int32)
    noisy = splits.noisy_labels(true, 25, 3, seed=0)  # the bank stores training (noisy) labels
    assert np.mean(noisy != true) == 0.25
    sup = tiny("cmsf_sup", topk=6)
    bank = rng.normal(size=(64, 16)).astype(np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    sup.bank.embeddings.assign(bank)
    sup.bank.labels.assign(noisy)
    queries = bank[:8] + 0.1 * rng.normal(size=(8, 16)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    query_labels = np.array([0, 1, 2, 0, 1, 2, 2, 5], np.int32)  # label 5: no bank row has it
    sims = queries @ bank.T
    (_, got), = sup.neighbour_sets({"label": tf.constant(query_labels)}, tf.constant(queries), tf.constant(sims))
    for q in range(8):
        allowed = noisy == query_labels[q]
        # Reference: same-label rows by similarity; if fewer than k, then the other rows by similarity.
        order = np.argsort(-sims[q], kind="stable")
        want = np.concatenate([order[allowed[order]], order[~allowed[order]]])[:6]
        np.testing.assert_allclose(np.sort(sims[q][got.numpy()[q]]), np.sort(sims[q][want]), atol=1e-6)
        if allowed.sum() >= 6:
            assert np.all(noisy[got.numpy()[q]] == query_labels[q])
    assert not np.any(noisy == 5)  # the last query was filled entirely from other classes, nearest first


def separable_batch():
    """Images whose class is their colour: 4 classes, 16 images, separable by a linear classifier."""
    rng = np.random.default_rng(1)
    labels = np.arange(BATCH) % 4
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], np.uint8)
    images = np.clip(colours[labels][:, None, None, :] + rng.integers(-40, 40, (BATCH, SIZE, SIZE, 3)), 0, 255)
    src = sources.InMemorySource("colours", images.astype(np.uint8), labels.astype(np.int32), None, None, 4)
    return next(iter(pipeline.train_dataset(src, global_batch=BATCH, image_size=SIZE, seed=0, steps_per_epoch=1,
                                            start_epoch=0, end_epoch=1, strong_view=False)))


def tiny_xent(seed=0):
    keras.utils.set_random_seed(seed)
    model = METHODS["xent"](arch="resnet18_small", image_size=SIZE, num_classes=4, width=4, weight_decay=1e-4)
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
    return model


def test_xent_fits_a_tiny_separable_set():
    batch = separable_batch()
    assert "strong" not in batch  # the baseline trains on the weak view alone
    history = fit_steps(tiny_xent(), batch, 30)
    assert history["train_top1"][-1] == 1.0 and history["train_top1_true"][-1] == 1.0
    assert history["loss"][-1] < 0.2 * history["loss"][0]
    assert len(tiny_xent().optimizer.momentums) == len(tiny_xent().online_variables)


def test_xent_ignores_unlabelled_examples_and_reports_noisy_and_true_accuracy():
    batch = dict(separable_batch())
    # Unlabelled examples: with only them, the loss is zero and nothing is learnt.
    unlabelled = dict(batch, label=tf.fill([BATCH], -1))
    model = tiny_xent()
    before = [v.numpy() for v in model.online_backbone.trainable_variables]
    history = fit_steps(model, unlabelled, 1)
    assert history["loss"] == [0.0]
    # Only weight decay moves the weights: w <- w - lr * wd * w.
    for b, v in zip(before, model.online_backbone.trainable_variables):
        np.testing.assert_allclose(v.numpy(), b * (1 - 0.05 * 1e-4), rtol=1e-5, atol=1e-7)
    # Flipped training labels: fitted, top-1 against the training labels rises while the true one falls.
    noisy = dict(batch, label=(batch["true_label"] + 1) % 4)
    history = fit_steps(tiny_xent(), noisy, 30)
    assert history["train_top1"][-1] == 1.0 and history["train_top1_true"][-1] == 0.0


def tiny_pseudo(topk=3, bank=64, cache=32, threshold=0.85):
    keras.utils.set_random_seed(0)
    model = METHODS["cmsf_pseudo"](arch="resnet18_small", image_size=SIZE, width=4, proj_hidden=32, proj_dim=16,
                                   bank_size=bank, topk=topk, ema_momentum=0.9, weight_decay=1e-4, num_classes=4,
                                   conf_threshold=threshold, cache_size=cache)
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
    return model


def test_cmsf_pseudo_non_confident_rows_never_constrain_and_unconstrained_queries_get_msf():
    rng = np.random.default_rng(11)
    model = tiny_pseudo(topk=4)
    bank = rng.normal(size=(64, 16)).astype(np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    bank_labels = np.where(rng.random(64) < 0.4, -1, rng.integers(0, 4, 64)).astype(np.int32)
    model.bank.embeddings.assign(bank)
    model.bank.labels.assign(bank_labels)
    targets = bank[:6]
    # Queries: two labelled (0, 3), two confidently pseudo-labelled (as 1 and 2), two not confident.
    probs = np.full((6, 4), 0.25, np.float32)
    probs[2], probs[3] = [0.05, 0.9, 0.03, 0.02], [0.0, 0.0, 0.95, 0.05]
    model.pseudo_probabilities = lambda t: tf.constant(probs)
    batch = {"label": tf.constant([0, 3, -1, -1, -1, -1]), "is_labelled": tf.constant([True, True] + [False] * 4)}
    batch["query_label"] = model.query_labels(batch, tf.constant(targets))  # as the train step passes it on
    sims = targets @ bank.T
    (w1, constrained), (w2, unconstrained) = model.neighbour_sets(batch, tf.constant(targets), tf.constant(sims))
    assert (w1, w2) == (1.0, 0.0)  # the loss is the constrained one alone
    query_labels = [0, 3, 1, 2, -1, -1]
    for q, label in enumerate(query_labels):
        got = constrained.numpy()[q]
        if label < 0:  # unconstrained: the plain top-k
            np.testing.assert_array_equal(got, np.argsort(-sims[q], kind="stable")[:4])
        else:
            n_same = int(np.sum(bank_labels == label))
            assert np.all(bank_labels[got[:min(n_same, 4)]] == label)
            assert not np.any(bank_labels[got[:min(n_same, 4)]] == -1)  # -1 rows never match a label
        np.testing.assert_array_equal(unconstrained.numpy()[q], np.argsort(-sims[q], kind="stable")[:4])
    np.testing.assert_array_equal(model.query_labels(batch, tf.constant(targets)).numpy(), query_labels)


def test_cmsf_pseudo_caches_the_labelled_rows_and_reports_pseudo_label_metrics():
    model = tiny_pseudo(cache=32, threshold=0.3)
    batch = dict(fixed_batch())
    labels = np.where(np.arange(BATCH) % 4 == 0, batch["true_label"].numpy(), -1)
    batch["label"] = tf.constant(labels, tf.int32)
    batch["is_labelled"] = tf.constant(labels >= 0)
    history = fit_steps(model, batch, 3)
    embeddings, cached_labels = model.labelled_cache.contents()
    assert len(cached_labels) == 3 * 4  # 4 labelled images per step, 3 steps
    np.testing.assert_array_equal(cached_labels, np.tile(labels[labels >= 0], 3))
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
    for name in ("pseudo_accuracy", "confident_fraction", "purity", "purity_unconstrained"):
        assert all(0.0 <= v <= 1.0 for v in history[name]), name
    # The cache is a ring: 3 more steps of 4 rows overflow 32 and wrap around.
    fit_steps(model, batch, 6)
    assert len(model.labelled_cache.contents()[1]) == 32 and int(model.labelled_cache.pointer.numpy()) == 36 % 32


def test_pseudo_head_trains_to_high_accuracy_on_cached_separable_features():
    from cmsf_tf.callbacks.pseudo_label import train_head
    from cmsf_tf.models import heads

    rng = np.random.default_rng(2)
    centres = rng.normal(size=(5, 16))
    y = rng.integers(0, 5, 1000)
    x = centres[y] + 0.3 * rng.normal(size=(1000, 16))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    head = heads.mlp(16, 32, 5, name="pseudo_head")
    accuracy = train_head(head, x[:800], y[:800], epochs=10, lr=0.05, milestones=(6, 8), batch_size=64)
    assert accuracy > 0.95
    held_out = np.argmax(head(x[800:].astype(np.float32), training=False).numpy(), axis=1)
    assert np.mean(held_out == y[800:]) > 0.95


def test_pseudo_head_weight_decay_is_torch_sgds_and_the_defaults_are_the_papers():
    """One SGD step with and without weight decay differs by exactly -lr * wd * w0 on every parameter
    (torch.optim.SGD's coupled decay: grad += wd * p); the defaults are pseudo_label_train.py's as the
    paper ran it: lr 0.01, wd 1e-4, milestones 15,30,40 that 10 passes never reach."""
    from cmsf_tf import config
    from cmsf_tf.callbacks.pseudo_label import train_head
    from cmsf_tf.models import heads

    rng = np.random.default_rng(4)
    x = rng.normal(size=(64, 8)).astype(np.float32)
    y = rng.integers(0, 3, 64)
    heads_ = [heads.mlp(8, 16, 3, name=f"pseudo_head_{i}") for i in range(2)]
    heads_[1].set_weights(heads_[0].get_weights())
    start = [w.copy() for w in heads_[0].get_weights()]
    train_head(heads_[0], x, y, epochs=1, lr=0.1, batch_size=64, weight_decay=0.0)
    train_head(heads_[1], x, y, epochs=1, lr=0.1, batch_size=64, weight_decay=0.01)
    trainable = {id(v) for v in heads_[0].trainable_variables}
    for v0, v1, w0 in zip(heads_[0].weights, heads_[1].weights, start):
        expected = -0.1 * 0.01 * w0 if id(v0) in trainable else 0.0  # BN moving stats: no decay
        np.testing.assert_allclose(v1.numpy() - v0.numpy(), expected, atol=1e-6)
    cfg = config.make(method="cmsf_pseudo", label_split="percent:10")
    assert cfg.pseudo_lr == 0.01 and cfg.pseudo_weight_decay == 1e-4
    assert min(int(m) for m in cfg.pseudo_milestones) >= cfg.pseudo_epochs == 10


def test_constraint_fill_reaches_the_label_constrained_methods():
    """--constraint_fill=official: a query whose label has no bank rows gets the lowest bank indices (ties
    at distance 5.0), as the paper's code; the default fills with its nearest rows."""
    batch = labelled_batch(np.zeros(BATCH, np.int32))
    sims = tf.random.stateless_uniform([BATCH, 64], [1, 2], -1, 1)
    got = {}
    for fill in ("nearest", "official"):
        keras.utils.set_random_seed(0)
        model = METHODS["cmsf_sup"](arch="resnet18_small", image_size=SIZE, width=4, proj_hidden=32, proj_dim=16,
                                    bank_size=64, topk=3, constraint_fill=fill)
        model.bank.labels.assign(np.ones(64, np.int32))  # no row has the queries' label 0
        (_, got[fill]), = model.neighbour_sets(dict(batch, query_label=batch["label"]), None, sims)
    np.testing.assert_array_equal(got["official"].numpy(), np.tile(np.arange(3), (BATCH, 1)))
    np.testing.assert_array_equal(got["nearest"].numpy(), np.argsort(-sims.numpy(), axis=1)[:, :3])


def test_every_method_describes_its_model_views_and_callbacks():
    """cmsf_tf.train has no per-method branches: each registered class builds itself from a run's Config
    and says which views its batches carry and which callbacks its training needs."""
    from cmsf_tf import config
    from cmsf_tf.callbacks.kmeans import KMeansClusters
    from cmsf_tf.callbacks.pseudo_label import PseudoLabelTrainer

    tiny = dict(dataset="fashion_mnist", arch="resnet18_small", width=4, image_size=28, batch_size=8, bank_size=16,
                topk=2, proj_hidden=16, proj_dim=8, topk_prime=2, num_clusters=3, labelled_cache_size=8)
    expected_callbacks = {"cmsf_km": [KMeansClusters], "cmsf_pseudo": [PseudoLabelTrainer]}
    for name, cls in METHODS.items():
        extra = {"label_split": "percent:10"} if name == "cmsf_pseudo" else {}
        cfg = config.make(method=name, **tiny, **extra)
        model = cls.from_run_config(cfg, sync_bn=False, num_images=40, num_classes=10)
        assert isinstance(model, cls) and model.online_backbone.output_shape[-1] == 32
        assert cls.views(cfg) == {"strong_view": name != "xent", "third_view": False, "multi_crop": None}, name
        if name != "xent":  # every mean-shift method carries the small crops, without a branch of its own
            small = config.make(method=name, multi_crop="2:14", **tiny, **extra)
            assert cls.views(small)["multi_crop"] == (2, 14, 0.05, 0.14), name
        callbacks = cls.training_callbacks(cfg, steps_per_epoch=5, logdir=None, log=print)
        assert [type(c) for c in callbacks] == expected_callbacks.get(name, []), name
    third = config.make(method="cmsf_2q", cmsf_2q_view="third", **tiny)
    assert METHODS["cmsf_2q"].views(third) == {"strong_view": True, "third_view": True, "multi_crop": None}
    assert METHODS["cmsf_2q"].from_run_config(third, sync_bn=False, num_images=40, num_classes=10).pool is None
