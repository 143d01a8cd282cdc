"""PyTorch weight files as NumPy: `.safetensors` (read and written here, no torch needed) and `.pth`
(read with `torch.load(weights_only=True)`; torch is an optional extra), and the checkpoint layouts of the
PyTorch code this family's weights come from (a registry: one entry per layout).

A state dict here is {name: NumPy array} (`read_state_dict`); `split_parts` splits it into the layout's
parts: {"online_backbone": {...torchvision names...}, "online_projector": {"0.weight": ...}, ...}.
"""

import argparse
import json
import os
import struct

import numpy as np

from cmsf_tf.errors import UserError


class WeightsError(UserError):
    """A weight file that cannot be read or used, said in one sentence."""


# ----- safetensors (https://github.com/huggingface/safetensors: 8-byte little-endian header length, a JSON
# header {name: {dtype, shape, data_offsets}}, then the raw little-endian tensor bytes) -----
_ST_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
              "U8": "u1", "BOOL": "?"}
_ST_NAMES = {np.dtype(v).str: k for k, v in _ST_DTYPES.items()}


def read_safetensors(path):
    """{name: array} of a .safetensors file (BF16 tensors widened to float32)."""
    try:
        with open(path, "rb") as f:
            blob = f.read()
        (length,) = struct.unpack("<Q", blob[:8])
        header = json.loads(blob[8:8 + length])
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path} is not a readable .safetensors file ({e})") from None
    data = memoryview(blob)[8 + length:]
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = entry["data_offsets"]
            shape, kind = tuple(entry["shape"]), entry["dtype"]
            if kind == "BF16":  # the upper half of a float32
                raw = np.frombuffer(data[begin:end], "<u2").astype(np.uint32) << 16
                out[name] = raw.view("<f4").astype(np.float32).reshape(shape)
            else:
                out[name] = np.frombuffer(data[begin:end], _ST_DTYPES[kind]).reshape(shape).copy()
        except (KeyError, TypeError, ValueError) as e:
            raise WeightsError(f"{path} is damaged: tensor {name!r} cannot be read ({e})") from None
    return out


def write_safetensors(path, tensors, metadata=None):
    """Writes {name: array} as .safetensors (names sorted, as the reference writer does)."""
    header, offset, chunks = {}, 0, []
    for name in sorted(tensors):
        array = np.asarray(tensors[name])
        array = np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<")) if array.dtype.byteorder == ">"
                                     else array)
        if array.dtype.str not in _ST_NAMES:
            raise WeightsError(f"tensor {name!r} has dtype {array.dtype}, which .safetensors does not hold")
        raw = array.tobytes()
        header[name] = {"dtype": _ST_NAMES[array.dtype.str], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        chunks.append(raw)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for raw in chunks:
            f.write(raw)


# ----- .pth -----
def _torch():
    try:
        import torch
    except ImportError:
        raise WeightsError("reading or writing a .pth file needs PyTorch: pip install 'cmsf_tf[torch]' "
                           "(or use a .safetensors file, which needs nothing more)") from None
    return torch


def read_pth(path):
    """The object in a .pth file, tensors as NumPy. Read with weights_only=True: a .pth is a pickle, which
    could run code when loaded; only tensors, plain containers, numbers, strings and argparse.Namespace
    (the authors' checkpoints store their options as one) are accepted."""
    torch = _torch()
    import pickle

    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        what = str(e).split("Unsupported global: ")[-1].split("was not an allowed global")[0].strip(" .\n")
        if "Unsupported global" in str(e) or "GLOBAL" in str(e):
            raise WeightsError(f"{path} would run code or build objects when loaded ({what[:120]}); refused: "
                               "only tensors, numbers, strings and argparse.Namespace are read") from None
        raise WeightsError(f"{path} is not a readable PyTorch file ({str(e).splitlines()[0][:200]})") from None
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        raise WeightsError(f"{path} is not a readable PyTorch file ({str(e).splitlines()[0][:200]})") from None
    return _to_numpy(obj, torch)


def _to_numpy(obj, torch):
    if isinstance(obj, torch.Tensor):
        tensor = obj.detach().cpu()
        return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()
    if isinstance(obj, dict):
        return {k: _to_numpy(v, torch) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_numpy(v, torch) for v in obj)
    return obj


def write_pth(path, tensors):
    torch = _torch()
    torch.save({name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in tensors.items()}, path)


def read_state_dict(path):
    """{name: array} of a weight file: a bare state dict or one wrapped as {'state_dict': ...} or
    {'model': ...} (with the training options and optimizer state beside it, which are ignored)."""
    if not os.path.isfile(path):
        raise WeightsError(f"--checkpoint {path} does not exist")
    obj = read_safetensors(path) if path.endswith(".safetensors") else read_pth(path)
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj:
        raise WeightsError(f"{path} holds no state dict (expected {{name: tensor}}, or one under 'state_dict' "
                           "or 'model')")
    arrays = {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}
    if not arrays:
        raise WeightsError(f"{path} holds no tensors")
    return arrays


# ----- layouts: where each part of the network sits in a checkpoint -----
# Parts: the ResNet backbones (torchvision names inside), the projection and prediction MLPs
# (Linear-BN-ReLU-Linear: "0.*", "1.*", "3.*" inside).
LAYOUTS = {}


def layout(name):
    def register(fn):
        LAYOUTS[name] = fn
        return fn
    return register


def _under(state, prefix):
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _split_fc(backbone):
    """A backbone's own tensors, and what hangs at its `fc.` (a classifier or the authors' projector)."""
    return {k: v for k, v in backbone.items() if not k.startswith("fc.")}, _under(backbone, "fc.")


@layout("cmsf")
def _authors(state):
    """The authors' MSF/CMSF training checkpoints: encoder_q / encoder_t (projector at their fc.), predict_q;
    wrapped by DistributedDataParallel (module.encoder_q.*) or by DataParallel per part (encoder_q.module.*)."""
    for wrap in ("module.{}.", "{}.module.", "{}."):
        if any(k.startswith(wrap.format("encoder_q")) for k in state):
            parts = {}
            for ours, theirs in (("online", "encoder_q"), ("target", "encoder_t")):
                backbone, projector = _split_fc(_under(state, wrap.format(theirs)))
                if backbone:
                    parts[f"{ours}_backbone"], parts[f"{ours}_projector"] = backbone, projector
            parts["predictor"] = _under(state, wrap.format("predict_q"))
            used = tuple(wrap.format(p) for p in ("encoder_q", "encoder_t", "predict_q"))
            return parts, sorted(k for k in state if not k.startswith(used))
    return None


@layout("solo-learn")
def _solo_learn(state):
    """solo-learn's methods: backbone.*, momentum_backbone.*, projector.*, momentum_projector.*, predictor.*."""
    if not any(k.startswith("backbone.") for k in state):
        return None
    names = {"online_backbone": "backbone.", "target_backbone": "momentum_backbone.",
             "online_projector": "projector.", "target_projector": "momentum_projector.", "predictor": "predictor."}
    parts = {ours: _under(state, theirs) for ours, theirs in names.items()}
    parts["online_backbone"], classifier = _split_fc(parts["online_backbone"])
    return parts, sorted(k for k in state if not k.startswith(tuple(names.values())))


@layout("torchvision")
def _torchvision(state):
    """A plain torchvision ResNet state dict (its classifier fc.* ignored)."""
    if "conv1.weight" not in state:
        return None
    backbone, classifier = _split_fc(state)
    return {"online_backbone": backbone}, sorted("fc." + k for k in classifier)


def split_parts(state, path="the checkpoint"):
    """(layout name, {part: state dict}, [ignored tensor names]) of a checkpoint's state dict; empty parts
    dropped."""
    for name, recognise in LAYOUTS.items():
        found = recognise(state)
        if found is not None:
            parts, ignored = found
            return name, {k: v for k, v in parts.items() if v}, ignored
    sample = ", ".join(sorted(state)[:3])
    raise WeightsError(f"{path} is not a checkpoint layout cmsf_tf knows (its tensors begin {sample}); expected a "
                       f"torchvision ResNet, the authors' MSF/CMSF checkpoint or solo-learn's")
