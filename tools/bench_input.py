"""Input-pipeline benchmark: two-view training images per second per CPU core at 224 px, from JPEGs of
ImageNet size (made by the tool), for our tf.data pipeline and for the paper's transforms in
torchvision (when the reference interpreter has torchvision; else the same PIL operations torchvision
calls). Each side runs on one core; the sides take turns round by round (the reference in its own
process, `--reference_python` may name another interpreter, e.g. a venv with torch + torchvision).

Both sides are measured with the authors' output (float32 ImageNet-normalised CHW/HWC tensors:
torchvision's ToTensor + Normalize) and with uint8 output (what cmsf_tf's pipeline emits: the train step
converts and normalises the batch on the accelerator; torchvision's PILToTensor), so the like-for-like
ratio is printed beside the headline one. `--multi_crop=6:96` adds our pipeline with that many small crops
per image (the ImageNet spec of docs/multi_crop.md), timed in the same rounds: its images/s against the
pipeline without them says what the small crops cost the input side (the train step's cost is bench_step's
--compare_multi_crop).

    python tools/bench_input.py [--images=256 --seconds=10 --rounds=3 --reference_python=PY --multi_crop=6:96]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import benchlib  # noqa: E402


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


def tf_iterator(paths, batch=32, normalised=False, multi_crop=None):
    """Our training stream on one core. `normalised`: also convert and normalise each batch in the
    input pipeline (float32 out, the authors' output), instead of leaving it to the train step.
    `multi_crop`: (n, size, min_scale, max_scale) small crops per image as well."""
    import tensorflow as tf

    from cmsf_tf.data import augment, pipeline, sources

    labels = np.zeros(len(paths), np.int32)
    src = sources.FileSource("bench", np.array(paths), labels, np.array(paths[:1]), labels[:1], 1, ("x",))
    ds = pipeline.train_dataset(src, global_batch=batch, image_size=224, seed=0, steps_per_epoch=len(paths) // batch,
                                start_epoch=0, end_epoch=100_000, multi_crop=multi_crop)
    if normalised:
        ds = ds.map(augment.model_views)
    options = tf.data.Options()
    options.threading.private_threadpool_size = 1  # one core
    options.threading.max_intra_op_parallelism = 1
    it = iter(ds.with_options(options))
    next(it)  # tracing and warm-up
    return it


def time_tf(it, seconds):
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        done += int(next(it)["weak"].shape[0])
    return done / (time.perf_counter() - start)


def step_normalise_ms(batch=32):
    """ms per image of the train step's conversion of uint8 views to normalised float (one core)."""
    import tensorflow as tf

    from cmsf_tf.data import augment

    views = {k: tf.constant(np.random.default_rng(0).integers(0, 256, (batch, 224, 224, 3), np.uint8))
             for k in ("weak", "strong")}
    fn = tf.function(augment.model_views)
    times = benchlib.alternate({"normalise": lambda: float(fn(views)["weak"][0, 0, 0, 0])}, rounds=1, repeats=20)
    return benchlib.median_ms(times["normalise"]) / batch


def reference_views(uint8_out):
    """(name, weak, strong): the authors' two views (UCDvision/CMSF data_loader.py:81, get_train_loader:
    torchvision's RandomResizedCrop, ColorJitter, RandomGrayscale, their own GaussianBlur class calling
    PIL's ImageFilter.GaussianBlur, RandomHorizontalFlip, ToTensor, Normalize) with torchvision if it
    imports, else the same PIL calls."""
    import random

    from PIL import Image, ImageEnhance, ImageFilter, ImageOps

    def pil_blur(img):  # the authors' GaussianBlur: sigma uniform in [0.1, 2], PIL's filter
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))

    try:
        import torch
        import torchvision
        from torchvision import transforms as T

        torch.set_num_threads(1)
        if uint8_out:
            finish = [T.PILToTensor()]
        else:
            finish = [T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
        weak = T.Compose([T.RandomResizedCrop(224, scale=(0.2, 1.0)), T.RandomHorizontalFlip()] + finish)
        strong = T.Compose([
            T.RandomResizedCrop(224, scale=(0.2, 1.0)), T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2), T.RandomApply([pil_blur], p=0.5), T.RandomHorizontalFlip()] + finish)
        return f"torchvision {torchvision.__version__}", weak, strong
    except Exception:  # noqa: BLE001 - not installed, or a build that does not load
        pass

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
        if uint8_out:
            return np.asarray(img, np.uint8).transpose(2, 0, 1).copy()
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
            img = pil_blur(img)
        return to_array(img)

    return "PIL with torchvision's operations", weak, strong


def reference_round(directory, seconds, uint8_out):
    """(name, images/s) of the reference pipeline for `seconds` (torchvision's default loader)."""
    from PIL import Image

    paths = sorted(os.path.join(directory, f) for f in os.listdir(directory))
    name, weak, strong = reference_views(uint8_out)
    for path in paths[:4]:  # warm-up
        with Image.open(path) as f:
            img = f.convert("RGB")
        weak(img), strong(img)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        with Image.open(paths[done % len(paths)]) as f:
            img = f.convert("RGB")
        weak(img), strong(img)
        done += 1
    return name, done / (time.perf_counter() - start)


def run_reference(python, directory, seconds, uint8_out):
    out = subprocess.run([python, os.path.abspath(__file__), f"--_reference={directory}", f"--seconds={seconds}"]
                         + (["--_uint8"] if uint8_out else []), capture_output=True, text=True, check=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=10.0, help="per side and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reference_python", default=sys.executable,
                        help="the interpreter of the reference pipeline (one with torchvision, if any)")
    parser.add_argument("--json", default="", help="append the JSON line to this file")
    parser.add_argument("--multi_crop", default="", metavar="N:SIZE[:MIN:MAX]",
                        help="also time our pipeline with N small crops of SIZE px per image (e.g. 6:96)")
    parser.add_argument("--_reference", default="", help=argparse.SUPPRESS)
    parser.add_argument("--_uint8", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._reference:
        name, rate = reference_round(args._reference, args.seconds, args._uint8)
        print(json.dumps({"name": name, "images_per_s": rate}))
        return
    from cmsf_tf import config
    from cmsf_tf.errors import UserError

    try:
        multi_crop = config.multi_crop_spec(args.multi_crop, 224)
    except UserError as e:
        sys.exit(f"error: {e}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    rates = {"ours_uint8": [], "ours_float": [], "ref_float": [], "ref_uint8": []}
    if multi_crop:
        rates["ours_multi_crop"] = []
    ref_name = None
    with tempfile.TemporaryDirectory() as d:
        paths = make_jpegs(d, args.images)
        ours = {"ours_uint8": tf_iterator(paths), "ours_float": tf_iterator(paths, normalised=True)}
        if multi_crop:
            ours["ours_multi_crop"] = tf_iterator(paths, multi_crop=multi_crop)
        for _ in range(args.rounds):
            for key, it in ours.items():
                rates[key].append(time_tf(it, args.seconds))
            for key, uint8_out in (("ref_float", False), ("ref_uint8", True)):
                r = run_reference(args.reference_python, d, args.seconds, uint8_out)
                ref_name = r["name"]
                rates[key].append(r["images_per_s"])
        normalise_ms = step_normalise_ms()
    med = {k: statistics.median(v) for k, v in rates.items()}

    def row(key, pipeline, output, vs_reference=None, vs_reference_uint8=None):
        return {"pipeline": pipeline, "output": output, "images_per_s": round(med[key], 1),
                "min": round(min(rates[key]), 1), "max": round(max(rates[key]), 1),
                "vs_reference": round(med[key] / med["ref_float"], 3) if vs_reference else None,
                "vs_reference_uint8": round(med[key] / med["ref_uint8"], 3) if vs_reference_uint8 else None}

    rows = [row("ours_uint8", "cmsf_tf, uint8 views (normalised in the train step)", "uint8", True, True),
            row("ours_float", "cmsf_tf, normalised float views in tf.data", "float32", True),
            row("ref_float", f"{ref_name}, ToTensor + Normalize (the authors')", "float32"),
            row("ref_uint8", f"{ref_name}, PILToTensor (uint8)", "uint8")]
    if multi_crop:  # images/s of the images with small crops against those without, both ours in uint8
        rows.append(dict(row("ours_multi_crop", f"cmsf_tf, uint8 views + {multi_crop[0]} small crops of "
                                                f"{multi_crop[1]} px", "uint8"),
                         vs_single_crop=round(med["ours_multi_crop"] / med["ours_uint8"], 3)))
    print(f"two-view 224 px training images/s on one core, {args.images} JPEGs of ~500x375, "
          f"median of {args.rounds} alternating rounds of {args.seconds:g} s:")
    for row in rows:
        print(f"  {row['pipeline']:<58} {row['images_per_s']:8.1f}  ({row['min']:.1f}-{row['max']:.1f})")
    print(f"  ratio to the authors' pipeline {rows[0]['vs_reference']:.2f}x (target >= 1.5x); uint8 to uint8 "
          f"{rows[0]['vs_reference_uint8']:.2f}x; the train step's uint8 -> normalised float: "
          f"{normalise_ms:.3f} ms per two-view image on one core")
    if multi_crop:
        print(f"  with {multi_crop[0]} small crops of {multi_crop[1]} px: {rows[-1]['vs_single_crop']:.2f}x the "
              "images/s without them")
    benchlib.emit_json("bench_input", rows, args.json,
                       settings={"images": args.images, "seconds": args.seconds, "rounds": args.rounds, "cores": 1,
                                 "image_size": 224, "reference": ref_name, "multi_crop": args.multi_crop,
                                 "step_normalise_ms_per_image": round(normalise_ms, 3)})


if __name__ == "__main__":
    main()
