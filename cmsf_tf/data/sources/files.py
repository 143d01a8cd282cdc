"""Image files on disk: which are complete, and how a tree of them is listed (folder and images)."""

import concurrent.futures
import os

from cmsf_tf.data.sources.base import DataError

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")


def check_image_file(path):
    """Why `path` is not a complete JPEG/PNG file, or None. Reads its first and last bytes only: a
    truncated JPEG lacks its end-of-image marker, which would stop training at decode time."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            f.seek(max(size - 1024, 0))
            tail = f.read()
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    if size == 0:
        return "empty file"
    if head[:3] == b"\xff\xd8\xff":
        return None if b"\xff\xd9" in tail else "truncated JPEG (no end-of-image marker)"
    if head == b"\x89PNG\r\n\x1a\n":
        return None if b"IEND" in tail else "truncated PNG (no IEND chunk)"
    return "not a JPEG or PNG image"


def _scan_split(root, classes, allow_missing=False):
    """(files, labels, non-image count) of root/<class>/* for the given classes."""
    files, labels, ignored = [], [], 0
    for label, cls in enumerate(classes):
        d = os.path.join(root, cls)
        if not os.path.isdir(d):
            if allow_missing:
                continue
            raise DataError(f"class folder {d} does not exist")
        names = sorted(os.listdir(d))
        images = [n for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
        ignored += len(names) - len(images)
        if not images and not allow_missing:
            raise DataError(f"class folder {d} holds no images (*.jpg, *.jpeg, *.png)")
        files += [os.path.join(d, n) for n in images]
        labels += [label] * len(images)
    return files, labels, ignored


def _drop_corrupt(files, labels, max_fraction, what):
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        reasons = list(pool.map(check_image_file, files))
    bad = [(f, r) for f, r in zip(files, reasons) if r]
    if len(bad) > max_fraction * max(len(files), 1):
        shown = "; ".join(f"{f}: {r}" for f, r in bad[:3])
        raise DataError(f"{len(bad)} of {len(files)} {what} images are corrupt, more than "
                        f"--max_corrupt_fraction={max_fraction} (first: {shown})")
    keep = [r is None for r in reasons]
    return ([f for f, k in zip(files, keep) if k], [lab for lab, k in zip(labels, keep) if k], bad)


def _walk_images(root, skip=()):
    """Every image file under `root` (any depth, sorted paths), leaving out the directories in `skip`."""
    found, ignored = [], 0
    for d, subdirs, names in os.walk(root):
        subdirs[:] = sorted(x for x in subdirs if os.path.join(d, x) not in skip)
        for n in sorted(names):
            if n.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.join(d, n))
            else:
                ignored += 1
    return found, ignored


def _holds_images(d):
    return any(e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS) for e in os.scandir(d))
