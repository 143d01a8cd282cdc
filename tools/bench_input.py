"""Input-pipeline benchmark: two-view training images per second per CPU core at 224 px, from JPEGs of
ImageNet size (made by the tool), for our tf.data pipeline and for a PIL pipeline with the paper's
transforms (torchvision's own when torch/torchvision are installed, else the same PIL operations
torchvision calls). Both run on one core, in one process, in the same run.

    python tools/bench_input.py [--images=256 --seconds=20]
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def make_jpegs(directory, count, seed=0):
    """JPEGs of ImageNet's typical size (about 500 x 375, quality 90) with photo-like smooth content."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        h, w = (375, 500) if i % 3 else (500, 375)
        coarse = rng.integers(0, 256, (h // 25 + 1, w // 25 + 1, 3)).astype(np.float32)
        image = tf.image.resize(coarse[None], (h, w), method="bicubic")[0]
        image = tf.clip_by_value(image + rng.normal(0, 12, (h, w, 3)), 0, 255)
        path = os.path.join(directory, f"img_{i:05d}.JPEG")
        tf.io.write_file(path, tf.io.encode_jpeg(tf.cast(image, tf.uint8), quality=90))
        paths.append(path)
    return paths


def bench_tf(paths, seconds, batch=32):
    import tensorflow as tf

    from cmsf_tf.data import pipeline, sources

    labels = np.zeros(len(paths), np.int32)
    src = sources.FileSource("bench", np.array(paths), labels, np.array(paths[:1]), labels[:1], 1, ("x",))
    steps = len(paths) // batch
    ds = pipeline.train_dataset(src, global_batch=batch, image_size=224, seed=0, steps_per_epoch=steps,
                                start_epoch=0, end_epoch=1000)
    options = tf.data.Options()
    options.threading.private_threadpool_size = 1  # one core
    options.threading.max_intra_op_parallelism = 1
    it = iter(ds.with_options(options))
    next(it)  # tracing and warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        b = next(it)
        done += int(b["weak"].shape[0])
    return done / (time.perf_counter() - start)


def pil_views():
    """The paper's two views with PIL: torchvision's transforms if installed, else the same PIL calls."""
    try:
        from torchvision import transforms as T

        normalize = T.Compose([T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
        weak = T.Compose([T.RandomResizedCrop(224, scale=(0.2, 1.0)), T.RandomHorizontalFlip(), normalize])
        strong = T.Compose([
            T.RandomResizedCrop(224, scale=(0.2, 1.0)), T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(p=0.2),
            T.RandomApply([T.GaussianBlur(23, sigma=(0.1, 2.0))], p=0.5), normalize])
        return "torchvision (PIL)", weak, strong
    except ImportError:
        pass
    import random

    from PIL import Image, ImageEnhance, ImageFilter, ImageOps

    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)

    def crop(img):
        w, h = img.size
        for _ in range(10):
            area = w * h * random.uniform(0.2, 1.0)
            ratio = np.exp(random.uniform(np.log(3 / 4), np.log(4 / 3)))
            cw, ch = int(round(np.sqrt(area * ratio))), int(round(np.sqrt(area / ratio)))
            if 0 < cw <= w and 0 < ch <= h:
                x, y = random.randint(0, w - cw), random.randint(0, h - ch)
                img = img.resize((224, 224), Image.BILINEAR, box=(x, y, x + cw, y + ch))
                break
        else:
            img = img.resize((224, 224), Image.BILINEAR)
        return img.transpose(Image.FLIP_LEFT_RIGHT) if random.random() < 0.5 else img

    def to_array(img):
        return ((np.asarray(img, np.float32) / 255.0 - mean) / std).transpose(2, 0, 1)

    def jitter(img):
        img = ImageEnhance.Brightness(img).enhance(random.uniform(0.6, 1.4))
        img = ImageEnhance.Contrast(img).enhance(random.uniform(0.6, 1.4))
        img = ImageEnhance.Color(img).enhance(random.uniform(0.6, 1.4))
        h, s, v = img.convert("HSV").split()
        shift = int(random.uniform(-0.1, 0.1) * 255)
        h = h.point(lambda p: (p + shift) % 256)
        return Image.merge("HSV", (h, s, v)).convert("RGB")

    def weak(img):
        return to_array(crop(img))

    def strong(img):
        img = crop(img)
        if random.random() < 0.8:
            img = jitter(img)
        if random.random() < 0.2:
            img = ImageOps.grayscale(img).convert("RGB")
        if random.random() < 0.5:
            img = img.filter(ImageFilter.GaussianBlur(random.uniform(0.1, 2.0)))
        return to_array(img)

    return "PIL, torchvision's operations (torchvision not installed)", weak, strong


def bench_pil(paths, seconds):
    from PIL import Image

    name, weak, strong = pil_views()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        with Image.open(paths[done % len(paths)]) as f:  # torchvision's default loader
            img = f.convert("RGB")
        weak(img), strong(img)
        done += 1
    return name, done / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--json", default="", help="append the JSON line to this file")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    with tempfile.TemporaryDirectory() as d:
        paths = make_jpegs(d, args.images)
        ours = bench_tf(paths, args.seconds)
        name, theirs = bench_pil(paths, args.seconds)
    print(f"two-view 224 px training images/s on one core, {args.images} JPEGs of ~500x375:")
    print(f"  cmsf_tf tf.data (decode_and_crop_jpeg) {ours:8.1f}")
    print(f"  {name:<38} {theirs:8.1f}")
    print(f"  ratio {ours / theirs:.2f}x (target >= 1.5x)")
    import benchlib

    benchlib.emit_json("bench_input", [
        {"pipeline": "cmsf_tf tf.data (decode_and_crop_jpeg)", "images_per_s": round(ours, 1),
         "vs_reference": round(ours / theirs, 3)},
        {"pipeline": name, "images_per_s": round(theirs, 1)}], args.json,
        settings={"images": args.images, "seconds": args.seconds, "cores": 1, "image_size": 224})


if __name__ == "__main__":
    main()
