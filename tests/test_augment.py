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


def smooth_image(h, w):
    """A smooth colour image (JPEG keeps it within a few levels)."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([(x * 255 / w), (y * 255 / h), ((x + y) * 127 / (w + h))], -1).astype(np.uint8)


def test_views_decode_their_crop_straight_from_jpeg_bytes():
    pixels = smooth_image(120, 160)
    encoded = tf.io.encode_jpeg(pixels, quality=98)
    decoded = tf.io.decode_jpeg(encoded, channels=3)
    for view in (augment.weak_view, augment.strong_view):
        fused = view(encoded, 32, seed(5)).numpy()
        whole = view(decoded, 32, seed(5)).numpy()
        # Same window from the same seed; the partial decode differs only by JPEG rounding.
        assert fused.shape == (32, 32, 3)
        assert np.abs(unnormalize(fused) - unnormalize(whole)).max() < 0.03
    fused, whole = augment.eval_view(encoded, 64).numpy(), augment.eval_view(decoded, 64).numpy()
    assert np.abs(unnormalize(fused) - unnormalize(whole)).max() < 0.03


def test_png_bytes_and_greyscale_jpeg_bytes_are_decoded_too():
    png = tf.io.encode_png(smooth_image(80, 100))
    grey = tf.io.encode_jpeg(smooth_image(80, 100)[..., :1])
    for encoded in (png, grey):
        for view in (augment.weak_view, augment.strong_view):
            assert view(encoded, 32, seed(1)).shape == (32, 32, 3)
        assert augment.eval_view(encoded, 72).shape == (72, 72, 3)


def test_eval_view_is_the_central_crop_of_the_shorter_side():
    pixels = np.zeros((100, 200, 3), np.uint8)
    pixels[:, 56:144] = 255  # white exactly where the central 88 x 88 square (0.875 x 100) lies
    out = unnormalize(augment.eval_view(pixels, 88).numpy())
    np.testing.assert_allclose(out, 1.0, atol=1e-5)  # the crop lies inside the white band


def test_one_partial_decode_serves_both_views():
    from cmsf_tf.data import pipeline

    encoded = tf.io.encode_jpeg(smooth_image(150, 200), quality=98)
    decoded = tf.io.decode_jpeg(encoded, channels=3)
    for third in (False, True):
        region = pipeline._views(encoded, 1, 2, 3, 48, 0.2, 0.5, third)
        whole = pipeline._views(decoded, 1, 2, 3, 48, 0.2, 0.5, third)
        assert region.keys() == whole.keys()
        for key in region:
            assert np.abs(unnormalize(region[key]) - unnormalize(whole[key])).max() < 0.03
