"""python -m cmsf_tf.convert: PyTorch weights (torchvision, the authors' MSF/CMSF checkpoints, solo-learn,
.safetensors) into cmsf_tf run directories and back, checked against a real PyTorch forward pass
(tools/torch_resnet.py, torchvision's layout) with random weights and random BatchNorm statistics."""

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # a test dependency (requirements-test.txt): skipped means not installed

from cmsf_tf import config, convert, weights_io  # noqa: E402
from tests.conftest import REPO, TINY, run_cli  # noqa: E402
from tools import torch_resnet  # noqa: E402


def torch_net(arch, width, seed=0):
    return torch_resnet.randomise(torch_resnet.ResNet(arch, width), seed).eval()


def numpy_state(net):
    return {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}


def convert_to_run(tmp_path, state, arch, width, image_size, name="run", **settings):
    path = tmp_path / f"{name}.pth"
    torch.save(state, path)
    cfg = config.make(model_dir=str(tmp_path / name), arch=arch, width=width, image_size=image_size, **settings)
    info = convert.from_torch(cfg, str(path), log=lambda m: None)
    return tmp_path / name, info


def torch_features(net, images_nhwc):
    with torch.no_grad():
        return net.features(torch.from_numpy(np.transpose(images_nhwc, (0, 3, 1, 2)).copy())).numpy()


@pytest.mark.parametrize("arch,width,size", [("resnet18", 64, 64), ("resnet50", 64, 64), ("resnet18_small", 16, 28)])
def test_imported_backbone_computes_what_torch_computes(tmp_path, arch, width, size):
    from cmsf_tf.eval import encoder

    net = torch_net(arch, width)
    run, info = convert_to_run(tmp_path, net.state_dict(), arch, width, size)
    assert info["layout"] == "torchvision" and info["imported"] == ["online_backbone"]
    assert info["copied"] == ["target_backbone"] and info["ignored"] == 2  # fc.weight, fc.bias
    images = np.random.RandomState(1).normal(size=(4, size, size, 3)).astype(np.float32)
    want = torch_features(net, images)
    for which in ("online", "target"):
        got = encoder.from_checkpoint(str(run), which=which).features(images).numpy()
        scale = np.abs(want).max()
        assert np.abs(got - want).max() <= 1e-4 * scale, (which, np.abs(got - want).max(), scale)

    # And back: the same tensors under the same names, which torch's ResNet loads missing only its classifier.
    out = tmp_path / "back.pth"
    convert.to_torch(str(run), "", "online", str(out), log=lambda m: None)
    back = torch.load(out, weights_only=True)
    original = numpy_state(net)
    assert set(back) == {k for k in original if not k.startswith("fc.")}
    for name, value in back.items():
        if not name.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(value.numpy(), original[name], err_msg=name)
    fresh = torch_resnet.ResNet(arch, width)
    result = fresh.load_state_dict(back, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys


def test_trained_cmsf_tf_backbone_goes_to_torch_and_computes_the_same(tiny_msf_run, tmp_path):
    """A run trained here, exported as .safetensors (no torch needed to write it), read by the reference
    safetensors package into torch's ResNet: the same features as the checkpoint's on the eval view."""
    from safetensors.torch import load_file

    from cmsf_tf.eval import encoder

    out = tmp_path / "online.safetensors"
    convert.to_torch(str(tiny_msf_run), "", "target", str(out), log=lambda m: None)
    net = torch_resnet.ResNet("resnet18_small", 4)
    result = net.load_state_dict(load_file(str(out)), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    images = np.random.RandomState(2).normal(size=(4, 28, 28, 3)).astype(np.float32)
    want = encoder.from_checkpoint(str(tiny_msf_run), which="target").features(images).numpy()
    got = torch_features(net.eval(), images)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_safetensors_reader_and_writer_agree_with_the_reference_package(tmp_path):
    from safetensors.numpy import load_file, save_file
    from safetensors.torch import save_file as save_torch

    rng = np.random.RandomState(0)
    tensors = {"a.weight": rng.normal(size=(3, 4, 2, 2)).astype(np.float32), "b": np.arange(5, dtype=np.int64),
               "c.half": rng.normal(size=(7,)).astype(np.float16), "scalar": np.array(3.5, np.float64)}
    ours = tmp_path / "ours.safetensors"
    weights_io.write_safetensors(str(ours), tensors, {"arch": "resnet18"})
    theirs = load_file(str(ours))
    assert set(theirs) == set(tensors)
    for name in tensors:
        np.testing.assert_array_equal(theirs[name], tensors[name])
    reference = tmp_path / "theirs.safetensors"
    save_file(tensors, str(reference))
    back = weights_io.read_safetensors(str(reference))
    for name in tensors:
        assert back[name].dtype == tensors[name].dtype
        np.testing.assert_array_equal(back[name], tensors[name])
    # bfloat16 (how many checkpoints are published) is widened to float32 exactly.
    bf16 = torch.randn(6, 3).to(torch.bfloat16)
    save_torch({"w": bf16}, str(tmp_path / "bf16.safetensors"))
    np.testing.assert_array_equal(weights_io.read_safetensors(str(tmp_path / "bf16.safetensors"))["w"],
                                  bf16.float().numpy())


def _mlp_state(prefix, in_dim, hidden, out, rng):
    return {f"{prefix}0.weight": rng.normal(size=(hidden, in_dim)), f"{prefix}0.bias": rng.normal(size=hidden),
            f"{prefix}1.weight": rng.uniform(0.5, 1.5, hidden), f"{prefix}1.bias": rng.normal(size=hidden),
            f"{prefix}1.running_mean": rng.normal(size=hidden), f"{prefix}1.running_var": rng.uniform(0.5, 1.5, hidden),
            f"{prefix}1.num_batches_tracked": np.array(5), f"{prefix}3.weight": rng.normal(size=(out, hidden)),
            f"{prefix}3.bias": rng.normal(size=out)}


def _authors_checkpoint(wrap, width=8, seed=0):
    """A checkpoint as the authors' train_msf.py / train_cmsf_*.py save it: model.state_dict() of MeanShift
    (encoder_q and encoder_t with the projector at fc, predict_q, the queue buffers), the options as an
    argparse.Namespace, the optimizer state and the epoch."""
    rng = np.random.RandomState(seed)
    feat, hidden, dim = width * 8, 32, 16
    state = {}
    for ours, theirs in (("online", "encoder_q"), ("target", "encoder_t")):
        net = torch_net("resnet18_small", width, seed + (ours == "target"))
        prefix = wrap.format(theirs)
        state.update({prefix + k: v for k, v in net.state_dict().items() if not k.startswith("fc.")})
        state.update({k: torch.tensor(v, dtype=torch.float32 if v.ndim else torch.int64)
                      for k, v in _mlp_state(prefix + "fc.", feat, hidden, dim, rng).items()})
    state.update({k: torch.tensor(v, dtype=torch.float32 if v.ndim else torch.int64)
                  for k, v in _mlp_state(wrap.format("predict_q"), dim, hidden, dim, rng).items()})
    state.update({"queue": torch.randn(64, dim), "labels": -torch.ones(64, dtype=torch.long),
                  "queue_ptr": torch.zeros(1, dtype=torch.long)})
    opt = argparse.Namespace(arch="resnet18", topk=5, mem_bank_size=64, weights=None)
    return {"opt": opt, "state_dict": state, "optimizer": {"state": {}, "param_groups": [{"lr": 0.05}]}, "epoch": 200}


@pytest.mark.parametrize("wrap", ["module.{}.", "{}.module."])
def test_the_authors_training_checkpoint_imports_every_part(tmp_path, wrap):
    """Both wrappings (DistributedDataParallel around the model, DataParallel around each part); the online
    and target backbones, projectors and predictor land where a new run's model restores them."""
    from cmsf_tf.methods import METHODS

    saved = _authors_checkpoint(wrap)
    run, info = convert_to_run(tmp_path, saved, "resnet18_small", 8, 28, proj_hidden=32, proj_dim=16)
    assert info["layout"] == "cmsf"
    assert info["imported"] == sorted(convert.PARTS) and info["copied"] == [] and info["new"] == []
    assert info["ignored"] == 3  # queue, labels, queue_ptr

    cfg = config.make(model_dir=str(tmp_path / "other"), arch="resnet18_small", width=8, image_size=28,
                      proj_hidden=32, proj_dim=16, bank_size=64, batch_size=32, method="cmsf_2q")
    model = METHODS["cmsf_2q"].from_run_config(cfg, sync_bn=False, num_images=100, num_classes=10)
    restored, fresh = convert.init_model(model, str(run), log=lambda m: None)
    assert restored == list(convert.PARTS) and fresh == []
    state = saved["state_dict"]
    for part, theirs in (("online_backbone", "encoder_q"), ("target_backbone", "encoder_t")):
        got = convert.torch_state_dict(getattr(model, part), part)
        for name, value in got.items():
            if not name.endswith("num_batches_tracked"):
                np.testing.assert_array_equal(value, state[wrap.format(theirs) + name].numpy(), err_msg=name)
    for part, prefix in (("online_projector", wrap.format("encoder_q") + "fc."),
                         ("target_projector", wrap.format("encoder_t") + "fc."), ("predictor", wrap.format("predict_q"))):
        got = convert.torch_state_dict(getattr(model, part), part)
        for name, value in got.items():
            if not name.endswith("num_batches_tracked"):
                np.testing.assert_allclose(value, state[prefix + name].numpy(), rtol=1e-6, err_msg=part + name)
    # The online projector really computes torch's Linear-BN-ReLU-Linear in eval mode.
    x = np.random.RandomState(3).normal(size=(5, 64)).astype(np.float32)
    head = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
    head.load_state_dict({k[len(wrap.format("encoder_q") + "fc."):]: v for k, v in state.items()
                          if k.startswith(wrap.format("encoder_q") + "fc.")})
    with torch.no_grad():
        want = head.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(model.online_projector(x, training=False).numpy(), want, rtol=1e-5, atol=1e-5)


def test_solo_learn_and_wrapped_state_dicts(tmp_path):
    net = torch_net("resnet18", 16)
    plain = {k: v for k, v in net.state_dict().items()}
    # solo-learn: backbone.* (+ its momentum copy), projector.*, a classifier beside them.
    momentum = torch_net("resnet18", 16, seed=5)
    solo = {"backbone." + k: v for k, v in plain.items() if not k.startswith("fc.")}
    solo.update({"momentum_backbone." + k: v for k, v in momentum.state_dict().items() if not k.startswith("fc.")})
    solo.update({"classifier.weight": torch.zeros(10, 128), "classifier.bias": torch.zeros(10)})
    run, info = convert_to_run(tmp_path, {"state_dict": solo, "epoch": 3}, "resnet18", 16, 32, name="solo")
    assert info["layout"] == "solo-learn" and info["imported"] == ["online_backbone", "target_backbone"]
    assert info["ignored"] == 2
    from cmsf_tf.eval import encoder

    images = np.random.RandomState(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
    target = encoder.from_checkpoint(str(run), which="target").features(images).numpy()
    want = torch_features(momentum, images)
    np.testing.assert_allclose(target, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    # {'model': state_dict} and .safetensors hold the same weights as the bare state dict.
    bare, _ = convert_to_run(tmp_path, plain, "resnet18", 16, 32, name="bare")
    wrapped, _ = convert_to_run(tmp_path, {"model": plain}, "resnet18", 16, 32, name="wrapped")
    weights_io.write_safetensors(str(tmp_path / "st.safetensors"), numpy_state(net))
    cfg = config.make(model_dir=str(tmp_path / "st"), arch="resnet18", width=16, image_size=32)
    convert.from_torch(cfg, str(tmp_path / "st.safetensors"), log=lambda m: None)
    reference = encoder.from_checkpoint(str(bare)).features(images).numpy()
    for run in (wrapped, tmp_path / "st"):
        np.testing.assert_array_equal(encoder.from_checkpoint(str(run)).features(images).numpy(), reference)


def _refusal(tmp_path, state, arch="resnet18_small", width=8, suffix=".pth"):
    path = tmp_path / f"bad{suffix}"
    if suffix == ".pth":
        torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}, path)
    else:
        weights_io.write_safetensors(str(path), state)
    cfg = config.make(model_dir=str(tmp_path / "out"), arch=arch, width=width, image_size=28)
    with pytest.raises((convert.ConvertError, weights_io.WeightsError)) as caught:
        convert.from_torch(cfg, str(path), log=lambda m: None)
    assert not (tmp_path / "out").exists()  # nothing written
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_weights_that_do_not_fit_are_refused_in_one_sentence_with_nothing_written(tmp_path):
    state = numpy_state(torch_net("resnet18_small", 8))
    missing = {k: v for k, v in state.items() if k != "layer3.1.bn2.running_var"}
    assert "has no online backbone tensor 'layer3.1.bn2.running_var'" in _refusal(tmp_path, missing, suffix=".safetensors")
    extra = dict(state, **{"layer2.0.conv9.weight": np.zeros((16, 16, 3, 3), np.float32)})
    assert "holds online backbone tensor 'layer2.0.conv9.weight', which a resnet18_small of width 8 does not have" \
        in _refusal(tmp_path, extra, suffix=".safetensors")
    shaped = dict(state, **{"layer1.0.conv2.weight": np.zeros((8, 8, 1, 1), np.float32)})
    assert "tensor 'layer1.0.conv2.weight' is 8x8x1x1" in _refusal(tmp_path, shaped, suffix=".safetensors")
    assert "needs 8x8x3x3" in _refusal(tmp_path, shaped, suffix=".safetensors")
    message = _refusal(tmp_path, numpy_state(torch_net("resnet18", 8)), suffix=".safetensors")
    assert "holds a resnet18 of width 8, not the resnet18_small of width 8 asked for" in message
    assert "holds a resnet50 of width 8" in _refusal(tmp_path, numpy_state(torch_net("resnet50", 8)), "resnet18", 8,
                                                       suffix=".safetensors")
    assert "is not a checkpoint layout cmsf_tf knows" in _refusal(tmp_path, {"w": np.zeros(3, np.float32)})
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    cfg = config.make(model_dir=str(tmp_path / "out"), arch="resnet18_small", width=8)
    with pytest.raises(weights_io.WeightsError, match="is not a readable .safetensors file"):
        convert.from_torch(cfg, str(tmp_path / "junk.safetensors"))


class _Payload:
    """Pickles to a call of os.system: what a malicious .pth does when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pth_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    state = dict(numpy_state(torch_net("resnet18_small", 8)))
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in state.items()}, "extra": _Payload(marker)}, path)
    cfg = config.make(model_dir=str(tmp_path / "out"), arch="resnet18_small", width=8)
    with pytest.raises(weights_io.WeightsError, match="would run code or build objects when loaded"):
        convert.from_torch(cfg, str(path))
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_pth_without_torch_says_how_to_get_it(tmp_path, monkeypatch):
    torch.save({"conv1.weight": torch.zeros(8, 3, 3, 3)}, tmp_path / "w.pth")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    with pytest.raises(weights_io.WeightsError, match=r"needs PyTorch: pip install 'cmsf_tf\[torch\]'"):
        weights_io.read_state_dict(str(tmp_path / "w.pth"))


def test_cli_convert_evaluate_export_train_and_back(tmp_path, fmnist_slice):
    """End to end through the commands: a torch resnet18_small of the tiny run's shape, converted; evaluate
    knn reads it as a run; train in the converted directory starts from it, and train --init_from in
    another; to_torch writes it back; refusals are one sentence, exit 2."""
    net = torch_net("resnet18_small", 4)
    torch.save({"state_dict": net.state_dict(), "epoch": 1}, tmp_path / "net.pth")
    flags = [*TINY, f"--data_dir={fmnist_slice}", "--epochs=1", "--steps_per_epoch=2"]  # the run's identity
    run = tmp_path / "converted"
    out = run_cli("cmsf_tf.convert", "from_torch", f"--checkpoint={tmp_path / 'net.pth'}", f"--model_dir={run}", *flags)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "torchvision layout" in out.stdout and "imported: online backbone" in out.stdout
    assert json.loads((run / "imported.json").read_text())["imported"] == ["online_backbone"]

    out = run_cli("cmsf_tf.evaluate", "knn", f"--model_dir={run}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((run / "eval" / "knn.json").read_text())["knn_top1_k20"] > 0.3

    out = run_cli("cmsf_tf.train", *flags, f"--model_dir={run}", "--noknn_eval")
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"initialised from {run}/checkpoints/ckpt-0: online backbone, target backbone" in out.stdout + out.stderr

    other = tmp_path / "init_from"
    out = run_cli("cmsf_tf.train", *flags, f"--model_dir={other}", f"--init_from={tmp_path / 'converted'}",
                  "--noknn_eval")
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"initialised from {run}/checkpoints/ckpt-2" in out.stdout + out.stderr  # its newest: trained from ckpt-0

    out = run_cli("cmsf_tf.convert", "to_torch", f"--model_dir={other}", f"--output={tmp_path / 'back.pth'}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"as {len([k for k in net.state_dict() if not k.startswith('fc.')])} torchvision-named tensors" in out.stdout
    assert torch_resnet.ResNet("resnet18_small", 4).load_state_dict(
        torch.load(tmp_path / "back.pth", weights_only=True), strict=False).missing_keys == ["fc.weight", "fc.bias"]

    for args, message in (
            (["from_torch", f"--checkpoint={tmp_path / 'net.pth'}", f"--model_dir={tmp_path / 'x'}", "--arch=resnet50"],
             "holds a resnet18_small of width 4, not the resnet50 of width 64 asked for"),
            (["from_torch", f"--checkpoint={tmp_path / 'net.pth'}", f"--model_dir={run}", *TINY],
             "already holds checkpoints"),
            (["to_torch", f"--model_dir={other}", f"--output={tmp_path / 'x.npz'}"], "must end in .pth"),
            (["sideways", f"--model_dir={other}"], "give one command, from_torch or to_torch")):
        out = run_cli("cmsf_tf.convert", *args)
        assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]
        assert "Traceback" not in out.stderr
    out = run_cli("cmsf_tf.train", *flags, f"--model_dir={tmp_path / 'y'}", f"--init_from={tmp_path / 'net.pth'}",
                  "--noknn_eval")
    assert out.returncode == 2 and "convert it first" in out.stderr, out.stderr[-2000:]
