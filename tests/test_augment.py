"""Views: stateless (same seed, same pixels; eager = tf.data), shapes and ranges, weak has no colour change."""

import numpy as np
import tensorflow as tf

from cmsf_tf.data import augment

MEAN, STD = np.array(augment.IMAGENET_MEAN), np.array(augment.IMAGENET_STD)
RNG = np.random.default_rng(0)
IMAGE = RNG.integers(0, 256, (40, 48, 3), dtype=np.uint8)


def seed(i):
    return tf.constant([7, i], tf.int64)


def unnormalize(x):
    return np.asarray(x) * STD + MEAN


def test_views_are_pure_functions_of_the_seed():
    for view in (augment.weak_view, augment.strong_view):
        a, b = view(IMAGE, 32, seed(1)), view(IMAGE, 32, seed(1))
        np.testing.assert_array_equal(a.numpy(), b.numpy())
        assert not np.array_equal(a.numpy(), view(IMAGE, 32, seed(2)).numpy())


def test_eager_and_tf_data_give_the_same_pixels():
    eager = [augment.strong_view(IMAGE, 32, seed(i)).numpy() for i in range(4)]
    ds = tf.data.Dataset.range(4).map(lambda i: augment.strong_view(IMAGE, 32, tf.stack([tf.constant(7, tf.int64), i])),
                                      num_parallel_calls=2)
    for want, got in zip(eager, ds):
        np.testing.assert_allclose(got.numpy(), want, atol=1e-6)


def test_shapes_and_ranges_including_greyscale_input():
    grey = RNG.integers(0, 256, (28, 28, 1), dtype=np.uint8)
    for image in (IMAGE, grey):
        for view in (augment.weak_view, augment.strong_view):
            out = view(image, 24, seed(3))
            assert out.shape == (24, 24, 3) and out.dtype == tf.float32
            pixels = unnormalize(out)
            assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def test_weak_view_keeps_colours_and_strong_view_changes_them():
    flat = np.zeros((32, 32, 3), np.uint8) + np.array([200, 60, 30], np.uint8)  # one colour everywhere
    colour = flat[0, 0] / 255.0
    for i in range(5):
        weak = unnormalize(augment.weak_view(flat, 16, seed(i))).reshape(-1, 3)
        np.testing.assert_allclose(weak, np.broadcast_to(colour, weak.shape), atol=2e-3)
    changed = [not np.allclose(unnormalize(augment.strong_view(flat, 16, seed(i)))[0, 0], colour, atol=1e-2)
               for i in range(20)]
    assert 0.6 <= np.mean(changed) <= 1.0  # jitter p=0.8, greyscale p=0.2


def test_crop_area_stays_within_the_scale_range():
    # A horizontal ramp: the span of values in a view is the fraction of the width it crops.
    ramp = np.tile(np.linspace(0, 255, 64).astype(np.uint8)[None, :, None], (64, 1, 3))
    spans = []
    for i in range(30):
        out = unnormalize(augment.weak_view(ramp, 64, seed(i)))[..., 0]
        spans.append(out.max() - out.min())
    # area >= 0.2 and aspect in [3/4, 4/3] => width >= sqrt(0.2 * 3/4) = 0.387 of the image
    assert min(spans) > 0.37 and max(spans) <= 1.0 + 1e-3


def test_eval_view_is_deterministic_and_centre_cropped():
    big = RNG.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    a = augment.eval_view(tf.constant(big), 224)
    assert a.shape == (224, 224, 3)
    np.testing.assert_array_equal(a.numpy(), augment.eval_view(tf.constant(big), 224).numpy())
    small = RNG.integers(0, 256, (28, 28, 1), dtype=np.uint8)
    np.testing.assert_allclose(unnormalize(augment.eval_view(small, 28))[..., 0], small[..., 0] / 255.0, atol=1e-6)
