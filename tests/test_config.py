"""Flag validation and the recipe flagfiles."""

import glob
import os

import pytest
from absl import flags

from cmsf_tf import config
from tests.conftest import REPO

FLAGFILES = sorted(glob.glob(os.path.join(REPO, "flags", "*.cfg")))


def parse(*args):
    config.define_flags()  # what the entry points do before absl parses
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
    (dict(multi_crop="6"), r"--multi_crop '6' is not N:SIZE\[:MIN_SCALE:MAX_SCALE\]"),
    (dict(multi_crop="six:96"), r"is not N:SIZE"),
    (dict(multi_crop="0:14"), r"N must be at least 1"),
    (dict(multi_crop="4:29"), r"SIZE between 1 and --image_size 28"),
    (dict(multi_crop="4:14:0.3:0.1"), r"0 < MIN_SCALE <= MAX_SCALE <= 1"),
    (dict(multi_crop="4:14:0:0.2"), r"0 < MIN_SCALE"),
    (dict(multi_crop="4:14", method="xent"), r"--method=xent has none"),
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


def test_settings_table_makes_the_config_and_the_run_identity():
    assert [f for f in config.Config.__dataclass_fields__] == [s.name for s in config.TRAIN_SETTINGS]
    # The settings a checkpoint's meaning depends on (resuming with another value is refused).
    assert set(config.RUN_IDENTITY) == {
        "method", "dataset", "class_list", "arch", "width", "image_size", "batch_size", "bank_size", "topk",
        "topk_prime", "cmsf_2q_view", "constraint_fill", "pool_dtype", "num_clusters", "proj_hidden", "proj_dim",
        "seed", "steps_per_epoch", "label_split", "label_noise", "label_noise_file", "label_smoothing",
        "labelled_cache_size", "conf_threshold", "multi_crop"}
    names = [s.name for s in config.TRAIN_SETTINGS + config.EVAL_SETTINGS]
    assert len(names) == len(set(names))
    assert config.make().to_dict() == {s.name: tuple(s.default) if s.kind == "list" else s.default
                                       for s in config.TRAIN_SETTINGS}


def test_importing_cmsf_tf_defines_no_flag(tmp_path):
    """A program that imports every public module can define its own --batch_size and --model_dir."""
    import subprocess
    import sys

    script = tmp_path / "user_program.py"
    script.write_text("""
import sys
from absl import app, flags
flags.DEFINE_integer("batch_size", 7, "the user's own flag")
flags.DEFINE_string("model_dir", "mine", "the user's own flag")
import cmsf_tf, cmsf_tf.config, cmsf_tf.train, cmsf_tf.evaluate, cmsf_tf.export, cmsf_tf.ops, cmsf_tf.memory
import cmsf_tf.methods, cmsf_tf.data.pipeline, cmsf_tf.data.labels, cmsf_tf.eval.knn, cmsf_tf.eval.linear
def main(argv):
    print("batch", flags.FLAGS.batch_size, flags.FLAGS.model_dir)
app.run(main)
""")
    out = subprocess.run([sys.executable, str(script), "--batch_size=3"], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "batch 3 mine" in out.stdout


def test_renamed_settings_keep_their_old_flag_and_old_run_dirs():
    assert parse("--model_dir=/tmp/x", "--sup_bank_size=640").labelled_cache_size == 640
    assert parse("--model_dir=/tmp/x", "--labelled_cache_size=320").labelled_cache_size == 320
    old = {"method": "cmsf_pseudo", "sup_bank_size": 6144, "seed": 1}
    assert config.upgrade_flags(old) == {"method": "cmsf_pseudo", "labelled_cache_size": 6144, "seed": 1}


def test_resuming_a_run_saved_under_an_old_setting_name(tmp_path):
    """A run directory whose flags.json says sup_bank_size resumes with the same value and is refused
    with another, under the setting's new name."""
    import json

    from cmsf_tf import train

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    cfg = config.make(method="cmsf_pseudo", model_dir=str(run), labelled_cache_size=6144, label_split="percent:10")
    saved = {("sup_bank_size" if k == "labelled_cache_size" else k): v for k, v in cfg.to_dict().items()}
    (run / "flags.json").write_text(json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in saved.items()}))
    train.prepare_model_dir(cfg)  # same value: accepted
    (run / "flags.json").write_text(json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in saved.items()}))
    other = config.make(method="cmsf_pseudo", model_dir=str(run), labelled_cache_size=512, label_split="percent:10")
    with pytest.raises(config.UsageError, match="--labelled_cache_size=6144, but this one asks for --labelled_cache_size=512"):
        train.prepare_model_dir(other)


_WORKER_PREPARES = """
import json, os, sys
from cmsf_tf import config, train
index, rounds, model_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
workers = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]
os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})
cfg = config.make(strategy="multi_worker", model_dir=model_dir)
for _ in range(rounds):
    train.prepare_model_dir(cfg)
print("ok", train.is_chief_process(cfg))
"""


def test_workers_of_one_fleet_prepare_the_same_model_dir_at_once(tmp_path):
    """Every worker of a multi-worker run proves --model_dir writable at the same moment; only the chief
    writes flags.json (whole, through a rename). Two workers once removed each other's probe file."""
    import json
    import subprocess
    import sys

    script = tmp_path / "prepare.py"
    script.write_text(_WORKER_PREPARES)
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=REPO)
    procs = [subprocess.Popen([sys.executable, str(script), str(index), str(rounds), str(run)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for index, rounds in ((0, 1), (1, 300), (2, 300))]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (stdout, stderr) in zip(procs, outs):
        assert p.returncode == 0, stderr[-2000:]
    assert [o[0].split() for o in outs] == [["ok", "True"], ["ok", "False"], ["ok", "False"]]
    assert json.loads((run / "flags.json").read_text())["strategy"] == "multi_worker"
    assert sorted(p.name for p in run.iterdir()) == [".lock", "flags.json"]  # no probe or temporary file left


def test_multi_crop_spec_reads_the_count_size_and_scales():
    assert config.multi_crop_spec("", 224) is None
    assert config.multi_crop_spec("6:96", 224) == (6, 96, 0.05, 0.14)  # SwAV / DINO's small crops
    assert config.multi_crop_spec("4:14:0.1:0.35", 28) == (4, 14, 0.1, 0.35)


@pytest.mark.parametrize("path", FLAGFILES, ids=os.path.basename)
def test_each_recipe_names_its_own_run_directory(path):
    """`python -m cmsf_tf.train --flagfile=flags/X.cfg` works as written: the recipe's run directory is
    runs/X, and a --model_dir after the flagfile overrides it."""
    name = os.path.basename(path)[:-len(".cfg")]
    assert parse(f"--flagfile={path}").model_dir == f"runs/{name}"
    assert parse(f"--flagfile={path}", "--model_dir=/tmp/elsewhere").model_dir == "/tmp/elsewhere"


def test_each_command_defines_its_own_flags_only():
    train = {s.name for s in config.command_settings("train")}
    knn = {s.name for s in config.command_settings("evaluate", ["knn"])}
    linear = {s.name for s in config.command_settings("evaluate", ["linear", "--model_dir=x"])}
    export = {s.name for s in config.command_settings("export")}
    assert "linear_epochs" not in train and "bank_size" not in knn and "epochs" not in knn
    assert "linear_epochs" in linear and "linear_epochs" not in knn and "knn_k" in knn and "knn_k" not in linear
    assert {"export_dir", "index", "knn_k"} <= export and "linear_epochs" not in export
    # without a protocol (`evaluate --helpfull`) every protocol's flags, so that the help lists them all
    assert {"knn_k", "linear_epochs", "transfer_l2"} <= {s.name for s in config.command_settings("evaluate", [])}
    # a method's own settings are declared by the method's registry entry, and every method's are train's
    from cmsf_tf import methods

    assert {"topk_prime", "num_clusters", "conf_threshold", "label_smoothing"} <= {s.name for s in methods.own_settings()}
    assert {s.name for s in methods.own_settings()} <= train


def test_an_unprepared_tfds_imagenet_says_how_to_provide_it(tmp_path, caplog):
    from cmsf_tf.data import sources

    with pytest.raises(sources.DataError) as error:
        sources.load("tfds:imagenet2012", str(tmp_path))
    # TFDS's own warning about a variant folder (that does not exist) is not printed before the sentence.
    assert not [r for r in caplog.records if "Variant folder" in r.getMessage()]
    assert os.listdir(tmp_path) == []  # nothing created in the data directory
    message = str(error.value)
    assert f"tfds:imagenet2012 is not prepared in {tmp_path}" in message
    assert os.path.join(str(tmp_path), "downloads", "manual") in message and "ILSVRC2012_img_train.tar" in message
    assert "--dataset=folder" in message and "\n" not in message
