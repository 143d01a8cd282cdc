"""Flag validation and the recipe flagfiles."""

import glob
import os

import pytest
from absl import flags

from cmsf_tf import config
from tests.conftest import REPO

FLAGFILES = sorted(glob.glob(os.path.join(REPO, "flags", "*.cfg")))


def parse(*args):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["train", *args])
    try:
        return config.Config(**{f: flags.FLAGS[f].value for f in config.Config.__dataclass_fields__})
    finally:
        flags.FLAGS.unparse_flags()


@pytest.mark.parametrize("path", FLAGFILES, ids=os.path.basename)
def test_flagfile_header_and_values(path):
    text = open(path).read()
    assert text.startswith("# python -m cmsf_tf.train --flagfile=flags/"), "first line: the command"
    config.validate(parse(f"--flagfile={path}", "--model_dir=/tmp/x"))


def test_demo_recipe_is_the_cpu_demo():
    cfg = parse(f"--flagfile={REPO}/flags/demo.cfg", "--model_dir=/tmp/x")
    assert (cfg.method, cfg.dataset, cfg.arch) == ("msf", "fashion_mnist", "resnet18_small")


def test_later_flags_override_the_flagfile():
    cfg = parse(f"--flagfile={REPO}/flags/demo.cfg", "--model_dir=/tmp/x", "--epochs=1")
    assert cfg.epochs == 1


@pytest.mark.parametrize("change,message", [
    (dict(bank_size=1000, batch_size=256), "not a multiple"),
    (dict(topk=10, bank_size=8, batch_size=8), "larger than --bank_size"),
    (dict(ema_momentum=1.0), "--ema_momentum"),
    (dict(learning_rate=0.0), "--learning_rate"),
    (dict(method="moco"), "unknown --method"),
    (dict(cpu_devices=2), "needs --strategy=mirrored"),
])
def test_validation_messages(change, message):
    base = parse(f"--flagfile={REPO}/flags/demo.cfg", "--model_dir=/tmp/x")
    with pytest.raises(config.UsageError, match=message):
        config.validate(config.Config(**{**base.to_dict(), **change}))


@pytest.mark.parametrize("noise", [5, 10, 25, 50])
def test_noisy_recipes_are_their_clean_recipe_plus_label_noise(noise, monkeypatch):
    monkeypatch.chdir(REPO)  # the noisy flagfiles include flags/sup.cfg and flags/xent.cfg by relative path
    for method, base in (("cmsf_sup", "sup"), ("xent", "xent")):
        clean = parse(f"--flagfile=flags/{base}.cfg", "--model_dir=/tmp/x")
        noisy = parse(f"--flagfile=flags/{base}_noisy{noise}.cfg", "--model_dir=/tmp/x")
        assert noisy.method == method and noisy.label_noise == noise
        assert {k: v for k, v in noisy.to_dict().items() if k != "label_noise"} == \
            {k: v for k, v in clean.to_dict().items() if k != "label_noise"}
