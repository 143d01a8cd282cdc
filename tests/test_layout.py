"""The code's house rules, checked as anyone can with grep and wc: each thing has one owner.

- a protocol is one module of cmsf_tf/eval/protocols/, a data set kind one of cmsf_tf/data/sources/, and
  each registry lists them (evaluate.py is the command line only);
- nobody outside cmsf_tf/data/ tests a source's class or kind; nobody outside cmsf_tf/rundir.py joins a
  run directory's file names onto a path;
- every error a user can mend is a UserError; the registries answer without loading TensorFlow;
- the README is a door (at most 25 KB), its links lead somewhere.
"""

import glob
import os
import re
import subprocess
import sys

from tests.conftest import REPO


def python_files(*parts):
    return sorted(glob.glob(os.path.join(REPO, *parts, "**", "*.py"), recursive=True))


def code_lines(path):
    """(line number, line) of a file's code, comments dropped."""
    with open(path) as f:
        return [(i, line.split("#", 1)[0]) for i, line in enumerate(f, 1)]


def test_one_module_per_protocol_and_per_data_set_kind():
    from cmsf_tf.data import sources
    from cmsf_tf.eval.protocols import PROTOCOLS

    assert set(PROTOCOLS) == {"knn", "linear", "semi", "finetune", "transfer", "projector"}
    for name, module in PROTOCOLS.items():
        assert module.__file__ == os.path.join(REPO, "cmsf_tf", "eval", "protocols", f"{name}.py")
        assert callable(module.run) and callable(module.summary_lines) and isinstance(module.SETTINGS, tuple)
    for name, load in sources.KINDS.items():
        assert load.__module__.startswith("cmsf_tf.data.sources."), name
    with open(os.path.join(REPO, "cmsf_tf", "evaluate.py")) as f:
        assert len(f.readlines()) <= 250


def test_no_source_kind_dispatch_outside_the_data_package():
    pattern = re.compile(r"isinstance\([^)]*(Source|source)|\bsource\.kind\b|(hasattr|getattr)\(source\b")
    found = [f"{os.path.relpath(p, REPO)}:{i}" for p in python_files("cmsf_tf") + python_files("tools")
             if not p.startswith(os.path.join(REPO, "cmsf_tf", "data") + os.sep)
             for i, line in code_lines(p) if pattern.search(line)]
    assert not found, found


def test_only_rundir_knows_the_run_directory_layout():
    names = r'"(flags\.json|checkpoints|tensorboard|result\.json|eval|knn_curve\.jsonl|constrained_ranks\.jsonl|\.lock|imported\.json|study)"'
    pattern = re.compile(r"os\.path\.join\([^)]*(model_dir|run_dir|path)[^)]*" + names)
    found = [f"{os.path.relpath(p, REPO)}:{i}" for p in python_files("cmsf_tf") + python_files("tools")
             if not p.endswith(os.path.join("cmsf_tf", "rundir.py"))
             for i, line in code_lines(p) if pattern.search(line)]
    assert not found, found


def test_every_user_error_is_one_type_and_the_registries_load_no_tensorflow():
    script = """
import sys
from cmsf_tf import config, errors, methods, rundir
from cmsf_tf.data import labels, sources
from cmsf_tf.eval import protocols
assert "tensorflow" not in sys.modules and "keras" not in sys.modules, "a registry loaded TensorFlow"
assert set(methods.METHODS) == set(config._METHODS) and set(protocols.PROTOCOLS) == set(config.PROTOCOLS)
from cmsf_tf import convert, weights_io
from cmsf_tf.eval import encoder
for error in (config.UsageError, sources.DataError, labels.LabelError, rundir.RunDirError, encoder.EncoderError,
              encoder.NotARunError, convert.ConvertError, weights_io.WeightsError):
    assert issubclass(error, errors.UserError), error
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3"))
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_the_readme_is_a_door_and_its_links_resolve():
    readme = os.path.join(REPO, "README.md")
    assert os.path.getsize(readme) <= 25 * 1024
    pages = [readme] + sorted(glob.glob(os.path.join(REPO, "docs", "*.md"))) + [os.path.join(REPO, "bench", "README.md")]
    broken = []
    for page in pages:
        with open(page) as f:
            text = f.read()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            if not os.path.exists(os.path.normpath(os.path.join(os.path.dirname(page), target))):
                broken.append(f"{os.path.relpath(page, REPO)} -> {target}")
    assert not broken, broken
