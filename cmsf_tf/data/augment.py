"""The paper's views as pure, stateless tf functions of (image, seed).

Stateless randomness keyed by (run seed, epoch, dataset index) makes every view reproducible: a resumed
run, or another worker, sees exactly the pixels the uninterrupted run would have seen.
Input: uint8 [H, W, C] (C = 1 or 3), or the encoded bytes of a JPEG/PNG (a scalar string), from which
a random crop is decoded directly (`tf.image.decode_and_crop_jpeg`: a 224 crop of a 500x375 photo does
not decode the whole photo).

Training views are uint8 [S, S, 3], rounded as torchvision's PIL pipeline rounds its images: a quarter of
float32's bytes through tf.data's buffers and to the accelerator, and no per-image conversion or
normalisation on the input cores. The train step's first operation turns a batch of them into
normalised float32 (`model_views`). Evaluation views are float32 [S, S, 3], ImageNet-normalised.
"""

import itertools
import math

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


VIEW_KEYS = ("weak", "strong", "third", "small")
# Views in these dtypes hold pixel levels 0-255: uint8, or bfloat16 where a device takes no uint8 input
# (TPUs; every integer up to 256 is exact in bfloat16's 8-bit mantissa). float32 views are normalised.
PIXEL_DTYPES = (tf.uint8, tf.bfloat16)


def to_model_input(images):
    """Pixel levels [..., H, W, C] (uint8 or bfloat16; one image or a batch) -> float32 ImageNet-normalised, (x / 255 - mean)
    / std as one multiply and one subtract. The rows are flattened to [..., H, W * C] and the channel
    constants tiled W times: TensorFlow's CPU kernels broadcast a row 4x faster than a last axis of 3
    (0.10 vs 0.42 ms per 224 px image on one core)."""
    shape = tf.shape(images)
    scale = tf.tile(tf.constant([1.0 / (255.0 * s) for s in IMAGENET_STD]), shape[-2:-1])
    shift = tf.tile(tf.constant([m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]), shape[-2:-1])
    rows = tf.reshape(tf.cast(images, tf.float32), tf.concat([shape[:-2], [-1]], 0))
    return tf.ensure_shape(tf.reshape(rows * scale - shift, shape), images.shape)


def model_views(batch):
    """The batch with its pixel-level training views (weak, strong, third; PIXEL_DTYPES) turned into
    normalised float32, the first thing a train step does, so the conversion runs on the accelerator over
    the whole batch. float32 views are taken as normalised and passed through (fixed in-memory benchmark
    or test batches)."""
    return {key: to_model_input(value) if key in VIEW_KEYS and value.dtype in PIXEL_DTYPES else value
            for key, value in batch.items()}


def quantize(image):
    """float32 pixel levels in [0, 255] -> uint8, rounded half up (as PIL rounds). The callers' values are
    in range (resizing with non-negative filters, clipped colour operations), so a cast suffices."""
    return tf.cast(image + 0.5, tf.uint8)


def image_shape(image):
    """[H, W, C] of a decoded image, or of encoded bytes without decoding them (JPEG header)."""
    if image.dtype != tf.string:
        return tf.shape(image)
    return tf.cond(tf.io.is_jpeg(image), lambda: tf.image.extract_jpeg_shape(image),
                   lambda: tf.shape(decode(image)))


def looks_like_image(encoded):
    """bool: the bytes start like a JPEG, PNG, GIF or BMP file (what decode_image reads); False for an
    empty string or anything else. Lets a batch skip a bad item instead of failing as a whole."""
    head = tf.strings.substr(encoded, 0, 8)
    return tf.logical_or(
        tf.logical_or(tf.strings.substr(head, 0, 3) == b"\xff\xd8\xff", head == b"\x89PNG\r\n\x1a\n"),
        tf.logical_or(tf.strings.substr(head, 0, 4) == b"GIF8",
                      tf.logical_and(tf.strings.substr(head, 0, 2) == b"BM", tf.strings.length(encoded) > 26)))


def decode(encoded):
    """The whole image, RGB uint8 (JPEG, PNG, and CMYK/greyscale JPEGs)."""
    return tf.ensure_shape(tf.io.decode_image(encoded, channels=3, expand_animations=False), [None, None, 3])


def crop(image, begin, size):
    """image[begin:begin+size] of a decoded image, or decoded straight from JPEG bytes."""
    if image.dtype != tf.string:
        out = tf.slice(image, tf.concat([begin[:2], [0]], 0), tf.concat([size[:2], [-1]], 0))
        return tf.ensure_shape(out, [None, None, image.shape[-1]])  # keep the static channel count
    window = tf.concat([begin[:2], size[:2]], 0)
    return tf.cond(tf.io.is_jpeg(image),
                   lambda: tf.image.decode_and_crop_jpeg(image, window, channels=3),
                   lambda: tf.slice(decode(image), tf.concat([begin[:2], [0]], 0), tf.concat([size[:2], [3]], 0)))


def crop_window(shape, seed, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), attempts=10):
    """(begin [3], size [3]) of a random resized crop of an image of `shape`, drawn as torchvision's
    RandomResizedCrop.get_params does: up to 10 attempts of (area uniform in scale x image area, aspect
    ratio log-uniform in `ratio`, side lengths rounded); the first that fits is placed uniformly;
    if none fits, the central crop of the whole image clamped to `ratio`. Stateless (a function of
    `seed`). (tf.image.sample_distorted_bounding_box draws the ratio and the height uniformly instead:
    on a 500 x 375 image its mean crop area is 0.46 of the image, torchvision's 0.50.)"""
    shape = tf.cast(shape, tf.int32)
    height, width = shape[0], shape[1]
    h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    s = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 4)
    target_area = h * w * tf.random.stateless_uniform([attempts], s[0], scale[0], scale[1])
    log_ratio = tf.random.stateless_uniform([attempts], s[1], math.log(ratio[0]), math.log(ratio[1]))
    aspect = tf.exp(log_ratio)
    crop_w = tf.round(tf.sqrt(target_area * aspect))  # round half to even, as Python's round
    crop_h = tf.round(tf.sqrt(target_area / aspect))
    fits = (crop_w > 0) & (crop_w <= w) & (crop_h > 0) & (crop_h <= h)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)  # the first attempt that fits
    in_ratio = w / h
    fallback_w = tf.where(in_ratio > ratio[1], tf.round(h * ratio[1]), w)
    fallback_h = tf.where(in_ratio < ratio[0], tf.round(w / ratio[0]), h)
    found = tf.reduce_any(fits)
    size_h = tf.cast(tf.where(found, crop_h[first], fallback_h), tf.int32)
    size_w = tf.cast(tf.where(found, crop_w[first], fallback_w), tf.int32)
    top = tf.where(found, tf.random.stateless_uniform([], s[2], 0, height - size_h + 1, dtype=tf.int32),
                   (height - size_h) // 2)
    left = tf.where(found, tf.random.stateless_uniform([], s[3], 0, width - size_w + 1, dtype=tf.int32),
                    (width - size_w) // 2)
    return tf.stack([top, left, 0]), tf.stack([size_h, size_w, -1])


def resize(image, size):
    """To size x size: area averaging when shrinking both sides (a box-filter antialias, 4x cheaper
    than tf.image.resize's antialiased bilinear), antialiased bilinear otherwise."""
    hw = tf.shape(image)[:2]
    return tf.cond(tf.reduce_all(hw >= size),
                   lambda: tf.image.resize(image, (size, size), method="area"),
                   lambda: tf.image.resize(image, (size, size), method="bilinear", antialias=True))


def decoded_region(encoded, windows):
    """Decodes once the bounding box of several crop windows [(begin, size), ...] of encoded bytes.
    Returns (pixels, origin, full shape): what random_resized_crop takes instead of the bytes, so two
    views of one image cost one partial decode."""
    shape = image_shape(encoded)
    top = tf.reduce_min(tf.stack([b[:2] for b, _ in windows]), axis=0)
    bottom = tf.reduce_max(tf.stack([b[:2] + s[:2] for b, s in windows]), axis=0)
    return crop(encoded, top, bottom - top), top, shape


def random_resized_crop(image, size, seed, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """Crop of random area fraction `scale` and aspect `ratio`, resized to size x size float32 RGB pixel
    levels in [0, 255] (not rounded). `image`: uint8 pixels, encoded bytes, or a decoded_region (pixels,
    origin, full shape). Resized straight from uint8 (tf.image.resize reads it), and a one-channel crop
    is resized before it is copied to three channels."""
    if isinstance(image, tuple):
        pixels, origin, shape = image
        begin, crop_size = crop_window(shape, seed, scale, ratio)
        cropped = crop(pixels, tf.concat([begin[:2] - origin, [0]], 0), crop_size)
    else:
        begin, crop_size = crop_window(image_shape(image), seed, scale, ratio)
        cropped = crop(image, begin, crop_size)
    out = resize(cropped, size)
    if out.shape[-1] == 1:
        out = tf.tile(out, [1, 1, 3])
    return tf.ensure_shape(out, (size, size, 3))


def crop_seed(view, seed):
    """The seed of a view's crop window (weak_view / strong_view split their seed this way)."""
    return tf.random.experimental.stateless_split(seed, 2 if view == "weak" else 11)[0]


def _coin(seed, p):
    return tf.random.stateless_uniform([], seed=seed) < p


LUMA = (0.299, 0.587, 0.114)


def grey(image):
    """ITU-R 601 luma, [..., 1] (what torchvision's rgb_to_grayscale computes). Three channel slices:
    a reduction over a last axis of 3 costs 5x more on one core."""
    return LUMA[0] * image[..., 0:1] + LUMA[1] * image[..., 1:2] + LUMA[2] * image[..., 2:3]


def jitter_factors(seeds, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1):
    """(brightness, contrast, saturation factors, hue shift) drawn as torchvision's ColorJitter."""
    def factor(seed, amount):
        return tf.random.stateless_uniform([], seed, 1 - amount, 1 + amount)

    return (factor(seeds[0], brightness), factor(seeds[1], contrast), factor(seeds[2], saturation),
            tf.random.stateless_uniform([], seeds[3], -hue, hue))


def jitter_order(seed):
    """int32 [4]: the order in which brightness (0), contrast (1), saturation (2), hue (3) are applied,
    a uniformly random permutation per image (torchvision's ColorJitter draws torch.randperm(4))."""
    return tf.argsort(tf.random.stateless_uniform([4], seed))


ORDERS = tuple(itertools.permutations(range(4)))


def order_index(order):
    """The position of a permutation of range(4) in ORDERS (a table lookup on its base-4 code)."""
    table = [0] * 256
    for i, p in enumerate(ORDERS):
        table[p[0] * 64 + p[1] * 16 + p[2] * 4 + p[3]] = i
    return tf.gather(tf.constant(table, tf.int32), tf.reduce_sum(order * tf.constant([64, 16, 4, 1], tf.int32)))


def color_jitter(image, seeds, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, order_seed=None):
    """torchvision's ColorJitter operations in a random order per image (`order_seed`; None: the fixed
    order brightness, contrast, saturation, hue): brightness scales; contrast blends with the mean grey
    level; saturation blends with the grey image; hue rotates in HSV. (TF's adjust_contrast uses
    per-channel means and adjust_saturation scales S in HSV: other operations, and the HSV round trip
    made jitter the slowest part of the pipeline.)"""
    b, c, s, h = jitter_factors(seeds, brightness, contrast, saturation, hue)

    def adjust_brightness(x):
        return tf.clip_by_value(x * b, 0.0, 1.0)

    def adjust_contrast(x):  # the mean grey level from the channel means (the mean of grey(x), cheaper)
        mean = tf.reduce_sum(tf.reduce_mean(x, axis=[0, 1]) * tf.constant(LUMA))
        return tf.clip_by_value(c * x + (1.0 - c) * mean, 0.0, 1.0)

    def adjust_saturation(x):
        return tf.clip_by_value(s * x + (1.0 - s) * grey(x), 0.0, 1.0)

    def adjust_hue(x):
        return tf.clip_by_value(tf.image.adjust_hue(x, h), 0.0, 1.0)

    operations = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)

    def apply(order):
        x = image
        for op in order:
            x = operations[op](x)
        return x

    if order_seed is None:
        return apply(range(4))
    # One switch over the 24 orders: a branch call per image instead of one per position (-0.4 ms at 224 px).
    index = order_index(jitter_order(order_seed))
    return tf.switch_case(index, [lambda order=order: apply(order) for order in ORDERS])


def gaussian_blur(image, sigma, radius):
    """Separable Gaussian blur with a (2*radius+1)-tap kernel (about a tenth of the image side).

    Not keras.ops.image.gaussian_blur: it zero-pads, darkening a frame of `radius` pixels (0.39 off at
    the border for sigma 1.3), where PIL's GaussianBlur in the paper's pipeline extends the edges; the
    interior is identical (1.8e-7)."""
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


def blur_radius(size, max_sigma):
    """Taps each side of the blur kernel: a tenth of the image side (SimCLR's kernel), but no more than
    4 sigma (scipy.ndimage's truncation; the weights beyond are < 3.4e-4 of the centre's): 8 instead of
    11 at 224 px for sigma <= 2, 27% less work, the blurred image within 2e-5."""
    return max(min(size // 20, math.ceil(4 * max_sigma)), 1)


def weak_view(image, size, seed, crop_scale=(0.2, 1.0)):
    """Random resized crop + horizontal flip; uint8 [size, size, 3]."""
    s = tf.random.experimental.stateless_split(seed, 2)
    image = quantize(random_resized_crop(image, size, s[0], scale=crop_scale))
    return tf.image.stateless_random_flip_left_right(image, s[1])


def strong_view(image, size, seed, crop_scale=(0.2, 1.0), jitter_p=0.8, gray_p=0.2, blur_p=0.5,
                blur_sigma=(0.1, 2.0)):
    """Weak view + colour jitter (0.4, 0.4, 0.4, 0.1, in a random order per image) p=0.8, greyscale
    p=0.2, blur sigma 0.1-2 p=0.5; uint8 [size, size, 3] (the colour operations run on [0, 1] floats)."""
    s = tf.random.experimental.stateless_split(seed, 11)
    image = random_resized_crop(image, size, s[0], scale=crop_scale) * (1.0 / 255.0)
    image = tf.image.stateless_random_flip_left_right(image, s[1])
    image = tf.cond(_coin(s[2], jitter_p), lambda: color_jitter(image, s[3:7], order_seed=s[10]), lambda: image)
    image = tf.cond(_coin(s[7], gray_p),
                    lambda: tf.tile(grey(image), [1, 1, 3]), lambda: image)
    sigma = tf.random.stateless_uniform([], s[8], blur_sigma[0], blur_sigma[1])
    radius = blur_radius(size, blur_sigma[1])
    image = tf.cond(_coin(s[9], blur_p), lambda: gaussian_blur(image, sigma, radius), lambda: image)
    return quantize(image * 255.0)


def eval_view(image, size, crop_fraction=0.875):
    """Deterministic. Small images (<= 64 px) are resized to size x size. Larger ones get torchvision's
    Resize(size / 0.875) + CenterCrop(size), computed the other way round: the central square of side
    0.875 x the shorter side is cut (decoded from JPEG bytes alone) and resized to size x size."""
    if image.dtype != tf.string and image.shape[0] is not None and image.shape[0] <= 64:
        image = to_rgb_float(image)
        if image.shape[0] != size:
            image = tf.clip_by_value(tf.image.resize(image, (size, size), method="bicubic", antialias=True), 0.0, 1.0)
        return normalize(image)
    shape = image_shape(image)[:2]
    side = tf.cast(tf.round(tf.cast(tf.reduce_min(shape), tf.float32) * crop_fraction), tf.int32)
    begin = (shape - side) // 2
    square = to_rgb_float(crop(image, begin, tf.stack([side, side])))
    image = tf.image.resize(square, (size, size), method="bilinear", antialias=True)
    return normalize(tf.clip_by_value(tf.ensure_shape(image, (size, size, 3)), 0.0, 1.0))
