"""The paper's views as pure, stateless tf functions of (image, seed).

Stateless randomness keyed by (run seed, epoch, dataset index) makes every view reproducible: a resumed
run, or another worker, sees exactly the pixels the uninterrupted run would have seen.
Input: uint8 [H, W, C] (C = 1 or 3). Output: float32 [S, S, 3], ImageNet-normalised.
"""

import tensorflow as tf

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_rgb_float(image):
    image = tf.image.convert_image_dtype(image, tf.float32)
    if image.shape[-1] == 1:
        image = tf.image.grayscale_to_rgb(image)
    return image


def normalize(image):
    return (image - IMAGENET_MEAN) / IMAGENET_STD


def random_resized_crop(image, size, seed, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """Crop of random area fraction `scale` and aspect `ratio`, resized to size x size."""
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seed,
        min_object_covered=0.0, aspect_ratio_range=ratio, area_range=scale, max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    crop = tf.slice(image, begin, crop_size)
    out = tf.image.resize(crop, (size, size), method="bicubic", antialias=True)
    return tf.ensure_shape(out, (size, size, image.shape[-1]))


def _coin(seed, p):
    return tf.random.stateless_uniform([], seed=seed) < p


def color_jitter(image, seeds, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1):
    """torchvision's ColorJitter factors (brightness multiplies), applied in a fixed order."""
    factor = tf.random.stateless_uniform([], seeds[0], 1 - brightness, 1 + brightness)
    image = tf.clip_by_value(image * factor, 0.0, 1.0)
    image = tf.clip_by_value(tf.image.stateless_random_contrast(image, 1 - contrast, 1 + contrast, seeds[1]), 0.0, 1.0)
    image = tf.image.stateless_random_saturation(image, 1 - saturation, 1 + saturation, seeds[2])
    image = tf.image.stateless_random_hue(image, hue, seeds[3])
    return tf.clip_by_value(image, 0.0, 1.0)


def gaussian_blur(image, sigma, radius):
    """Separable Gaussian blur with a (2*radius+1)-tap kernel (about a tenth of the image side)."""
    x = tf.range(-radius, radius + 1, dtype=tf.float32)
    kernel = tf.exp(-0.5 * tf.square(x / sigma))
    kernel /= tf.reduce_sum(kernel)
    channels = 3
    horizontal = tf.tile(tf.reshape(kernel, [1, -1, 1, 1]), [1, 1, channels, 1])
    vertical = tf.tile(tf.reshape(kernel, [-1, 1, 1, 1]), [1, 1, channels, 1])
    padded = tf.pad(image[None], [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="REFLECT")
    out = tf.nn.depthwise_conv2d(padded, horizontal, [1, 1, 1, 1], "VALID")
    out = tf.nn.depthwise_conv2d(out, vertical, [1, 1, 1, 1], "VALID")
    return out[0]


def weak_view(image, size, seed, crop_scale=(0.2, 1.0)):
    """Random resized crop + horizontal flip."""
    s = tf.random.experimental.stateless_split(seed, 2)
    image = random_resized_crop(to_rgb_float(image), size, s[0], scale=crop_scale)
    image = tf.image.stateless_random_flip_left_right(image, s[1])
    return normalize(tf.clip_by_value(image, 0.0, 1.0))


def strong_view(image, size, seed, crop_scale=(0.2, 1.0), jitter_p=0.8, gray_p=0.2, blur_p=0.5,
                blur_sigma=(0.1, 2.0)):
    """Weak view + colour jitter (0.4, 0.4, 0.4, 0.1) p=0.8, greyscale p=0.2, blur sigma 0.1-2 p=0.5."""
    s = tf.random.experimental.stateless_split(seed, 11)
    image = random_resized_crop(to_rgb_float(image), size, s[0], scale=crop_scale)
    image = tf.image.stateless_random_flip_left_right(image, s[1])
    image = tf.clip_by_value(image, 0.0, 1.0)
    image = tf.cond(_coin(s[2], jitter_p), lambda: color_jitter(image, s[3:7]), lambda: image)
    image = tf.cond(_coin(s[7], gray_p),
                    lambda: tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(image)), lambda: image)
    sigma = tf.random.stateless_uniform([], s[8], blur_sigma[0], blur_sigma[1])
    radius = max(size // 20, 1)
    image = tf.cond(_coin(s[9], blur_p), lambda: gaussian_blur(image, sigma, radius), lambda: image)
    return normalize(image)


def eval_view(image, size, crop_fraction=0.875):
    """Deterministic. Small images (<= 64 px) are resized to size x size; larger ones have their shorter
    side resized to size / 0.875 (aspect kept, as torchvision's Resize(256)) and are centre-cropped."""
    image = to_rgb_float(image)
    if image.shape[0] is not None and image.shape[0] <= 64:
        if image.shape[0] != size:
            image = tf.clip_by_value(tf.image.resize(image, (size, size), method="bicubic", antialias=True), 0.0, 1.0)
        return normalize(image)
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = (size / crop_fraction) / tf.reduce_min(shape)
    new_shape = tf.cast(tf.round(shape * scale), tf.int32)
    image = tf.image.resize(image, new_shape, method="bicubic", antialias=True)
    image = tf.image.resize_with_crop_or_pad(image, size, size)
    return normalize(tf.clip_by_value(tf.ensure_shape(image, (size, size, 3)), 0.0, 1.0))
