"""pyproject.toml: the wheel holds the library, its data and the recipes; the console scripts run from an
installation outside the checkout."""

import glob
import os
import subprocess
import sys
import zipfile

from tests.conftest import REPO


def test_wheel_installs_recipes_and_console_scripts(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                            str(tmp_path / "dist"), REPO], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = glob.glob(str(tmp_path / "dist" / "cmsf_tf-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for recipe in glob.glob(os.path.join(REPO, "flags", "*.cfg")):
        assert f"cmsf_tf/recipes/{os.path.basename(recipe)}" in names
    assert {"cmsf_tf/data/imagenet100.txt", "cmsf_tf/data/official/imagenet_10percent.txt",
            "cmsf_tf/methods/cmsf_2q.py"} <= names
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                              str(tmp_path / "site"), wheel], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-2000:]
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"), TF_CPP_MIN_LOG_LEVEL="3")
    for script, flag in (("cmsf-train", "--method"), ("cmsf-evaluate", "--knn_k"), ("cmsf-export", "--export_dir"),
                         ("cmsf-convert", "--init_from")):
        out = subprocess.run([os.path.join(tmp_path, "site", "bin", script), "--helpfull"], capture_output=True,
                             text=True, timeout=300, env=env, cwd=tmp_path)
        assert flag in out.stdout and "Traceback" not in out.stderr, (script, out.stderr[-2000:])  # absl's help exits 1
    # The installed demo recipe is self-contained: it validates from any directory.
    recipe = os.path.join(tmp_path, "site", "cmsf_tf", "recipes", "demo.cfg")
    check = subprocess.run([sys.executable, "-c", "import sys; from absl import flags; from cmsf_tf import config; "
                            "config.define_flags(); flags.FLAGS(['x', '--flagfile=' + sys.argv[1], '--model_dir=m']); "
                            "print(config.from_flags().method)", recipe], capture_output=True, text=True, timeout=300,
                           env=env, cwd=tmp_path)
    assert check.returncode == 0 and check.stdout.strip() == "msf", check.stderr[-2000:]
