"""The run directory under damage and interruption: what survives a deleted or truncated checkpoint, a
garbage state file, a corrupt flags.json, a full disk, two runs at once, a diverging run, SIGTERM, and
re-running a finished run."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
import tensorflow as tf

from cmsf_tf.rundir import RunDir
from tests.conftest import REPO, TINY
from tests.test_train_cli import assert_one_sentence_error, train

FLAGS = ["--epochs=2", "--steps_per_epoch=4", "--checkpoint_steps=2", "--noknn_eval"]


def checkpoints(model_dir):
    return sorted(int(n[5:].split(".")[0]) for n in os.listdir(model_dir / "checkpoints")
                  if n.startswith("ckpt-") and n.endswith(".index"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory, fmnist_slice):
    """A finished 8-step run with checkpoints at steps 4, 6 and 8 (the newest three of every 2 steps)."""
    d = tmp_path_factory.mktemp("rundir") / "run"
    out = train(f"--data_dir={fmnist_slice}", f"--model_dir={d}", *FLAGS)
    assert out.returncode == 0, out.stderr[-3000:]
    assert checkpoints(d) == [4, 6, 8]
    return d


def copy_run(finished, tmp_path, drop_result=True):
    d = tmp_path / "run"
    shutil.copytree(finished, d)
    if drop_result:
        (d / "result.json").unlink()
    return d


def resume(model_dir, fmnist_slice, *extra):
    return train(f"--data_dir={fmnist_slice}", f"--model_dir={model_dir}", *FLAGS, "--epochs=3", *extra)


def test_a_deleted_newest_index_resumes_from_the_previous_checkpoint(finished, tmp_path, fmnist_slice):
    """Without the fallback, latest_checkpoint was None: the run started over at step 0 and the manager's
    rotation deleted the good checkpoints."""
    d = copy_run(finished, tmp_path)
    os.remove(d / "checkpoints" / "ckpt-8.index")
    out = resume(d, fmnist_slice)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "warning: skipped ckpt-8: its .index file is missing" in out.stdout
    assert "resumed from" in out.stdout and "(step 6, epoch 2 of 3)" in out.stdout  # not a fresh start
    # mid-epoch: Keras's progress line counts the rest of epoch 2 as the last epoch of its own model.fit
    assert "Keras shows the rest of epoch 2 as 'Epoch 2/2', then epoch 3 as 'Epoch n/3'" in out.stdout
    assert (d / "checkpoints" / "damaged" / "ckpt-8.data-00000-of-00001").exists()
    assert json.loads((d / "result.json").read_text())["steps"] == 12
    assert checkpoints(d) == [8, 10, 12]


@pytest.mark.parametrize("damage", ["truncate_data", "zero_data", "non_finite", "garbage_state_file"])
def test_the_newest_usable_checkpoint_is_found_whatever_the_damage(finished, tmp_path, damage):
    from cmsf_tf import rundir

    d = tmp_path / "checkpoints"
    shutil.copytree(finished / "checkpoints", d)
    data = d / "ckpt-8.data-00000-of-00001"
    if damage == "truncate_data":
        with open(data, "r+b") as f:
            f.truncate(os.path.getsize(data) // 2)
    elif damage == "zero_data":
        data.write_bytes(b"\0" * os.path.getsize(data))
    elif damage == "non_finite":  # a checkpoint an older version saved after a step that diverged
        reader = tf.train.load_checkpoint(str(d / "ckpt-8"))
        names, dtypes = sorted(reader.get_variable_to_shape_map()), reader.get_variable_to_dtype_map()
        tensors = {n: reader.get_tensor(n) for n in names}
        variance = next(n for n in names if "moving_variance" in n)
        tensors[variance] = np.full_like(tensors[variance], np.inf)
        tf.raw_ops.SaveV2(prefix=str(d / "ckpt-8"), tensor_names=names, shape_and_slices=[""] * len(names),
                          tensors=[tf.constant(tensors[n], dtype=dtypes[n]) for n in names])
    else:
        (d / "checkpoint").write_text("\x00garbage{{{\n")
    messages = []
    prefix = rundir.usable_checkpoint(str(d), messages.append)
    if damage == "garbage_state_file":
        assert prefix == str(d / "ckpt-8") and "rewrote it" in messages[0]
    else:
        assert prefix == str(d / "ckpt-6")
        assert messages[0].startswith("warning: skipped ckpt-8: it "), messages
        assert ("non-finite" in messages[0]) == (damage == "non_finite"), messages
        assert sorted(os.listdir(d / "damaged")) == ["ckpt-8.data-00000-of-00001", "ckpt-8.index"]
    # The state file now lists the readable checkpoints, the newest being the one to resume from, so the
    # manager's rotation keeps them.
    assert tf.train.latest_checkpoint(str(d)) == prefix
    state = tf.train.get_checkpoint_state(str(d))
    assert [os.path.basename(p) for p in state.all_model_checkpoint_paths] == (
        ["ckpt-4", "ckpt-6", "ckpt-8"] if damage == "garbage_state_file" else ["ckpt-4", "ckpt-6"])


def test_checkpoints_of_which_none_reads_stop_with_one_sentence_and_are_kept(finished, tmp_path, fmnist_slice):
    d = copy_run(finished, tmp_path)
    for n in (4, 6, 8):
        os.remove(d / "checkpoints" / f"ckpt-{n}.index")
    before = sorted(os.listdir(d / "checkpoints"))
    out = resume(d, fmnist_slice)
    assert_one_sentence_error(out, r"holds checkpoints but none can be restored \(ckpt-8: its \.index file is missing\)")
    assert sorted(os.listdir(d / "checkpoints")) == before  # nothing rotated away or moved


def test_a_corrupt_flags_json_is_named_in_one_sentence(finished, tmp_path, fmnist_slice):
    d = copy_run(finished, tmp_path)
    (d / "flags.json").write_text('{"method": "msf", ')
    assert_one_sentence_error(resume(d, fmnist_slice), r"flags\.json is damaged .*; restore it, or remove it")


def test_a_second_run_on_the_same_model_dir_is_refused_and_a_stale_lock_is_not(tmp_path, fmnist_slice):
    from cmsf_tf import rundir

    d = tmp_path / "run"
    d.mkdir()
    held = rundir.lock(str(d))  # a run in progress (this process holds the flock)
    out = train(f"--data_dir={fmnist_slice}", f"--model_dir={d}", "--epochs=1", "--steps_per_epoch=1", "--noknn_eval")
    assert_one_sentence_error(out, rf"--model_dir {d} is in use by another run \(pid {os.getpid()} on ")
    assert not (d / "checkpoints").exists()
    held.close()  # what the kernel does when that run ends, kill -9 included: the file stays, the lock goes
    assert (d / ".lock").read_text().startswith("pid ")
    out = train(f"--data_dir={fmnist_slice}", f"--model_dir={d}", "--epochs=1", "--steps_per_epoch=1", "--noknn_eval")
    assert out.returncode == 0, out.stderr[-3000:]


def test_a_diverging_run_never_saves_or_names_a_non_finite_checkpoint(tmp_path, fmnist_slice):
    d = tmp_path / "run"
    out = train(f"--data_dir={fmnist_slice}", f"--model_dir={d}", "--learning_rate=1e6", "--checkpoint_steps=1",
                "--epochs=3", "--steps_per_epoch=4")
    assert_one_sentence_error(out, r"(the loss became|the state after step \d+ is not finite)")
    named = out.stderr.split("last good checkpoint: ")[-1].split(")")[0]
    saved = [str(d / "checkpoints" / f"ckpt-{n}") for n in checkpoints(d)]
    assert named in saved + ["none"]
    for prefix in saved:  # every checkpoint left is whole and finite
        reader = tf.train.load_checkpoint(prefix)
        for name in reader.get_variable_to_shape_map():
            value = reader.get_tensor(name)
            if isinstance(value, np.ndarray) and value.dtype.kind == "f":
                assert np.isfinite(value).all(), (prefix, name)


def test_a_failed_save_leaves_no_partial_files_and_keeps_the_previous_checkpoints(tmp_path):
    """Disk full while writing ckpt-3: TensorFlow leaves a ckpt-3_temp/ directory with a *.tempstate file;
    the saver removes it, names the failure in one sentence and the older checkpoints stay readable."""
    import keras

    from cmsf_tf.callbacks.checkpoint import CheckpointSaver, SaveFailed

    v = tf.Variable(tf.ones([1000]))
    ckpt = tf.train.Checkpoint(v=v)
    manager = tf.train.CheckpointManager(ckpt, str(tmp_path), max_to_keep=3)
    manager.save(checkpoint_number=1)
    manager.save(checkpoint_number=2)
    real_save = manager.save

    def full_disk_save(checkpoint_number):
        temp = tmp_path / f"ckpt-{checkpoint_number}_temp"
        temp.mkdir()
        (temp / "part-00000-of-00001.data-00000-of-00001.tempstate8093").write_bytes(b"x" * 4096)
        raise tf.errors.ResourceExhaustedError(None, None, f"{temp}/part-00000-of-00001.data-00000-of-00001."
                                               "tempstate8093; No space left on device")

    class Model:
        train_steps = tf.Variable(3)
        weights = [v]
        optimizer = keras.optimizers.SGD()

    saver = CheckpointSaver(manager, variables=[v])
    saver.set_model(Model())
    manager.save = full_disk_save
    with pytest.raises(SaveFailed, match=r"could not write checkpoint ckpt-3 to .* \(.*No space left on device\)"):
        saver.on_epoch_end(0)
    assert not list(tmp_path.glob("*temp*"))
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-2")
    manager.save = real_save
    tf.train.Checkpoint(v=tf.Variable(tf.zeros([1000]))).restore(str(tmp_path / "ckpt-1")).assert_consumed()


def test_orphans_of_a_killed_save_are_removed_at_start(finished, tmp_path, fmnist_slice):
    d = copy_run(finished, tmp_path)
    stale = d / "checkpoints" / "ckpt-10_temp"
    stale.mkdir()
    (stale / "part-00000-of-00001.data-00000-of-00001.tempstate123").write_bytes(b"x" * 1000)
    out = resume(d, fmnist_slice)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "removed the partial files of an interrupted save: ckpt-10_temp" in out.stdout
    assert not list((d / "checkpoints").glob("*_temp*"))


def test_sigterm_saves_at_the_next_step_and_the_run_resumes(tmp_path, fmnist_slice):
    d = tmp_path / "run"
    args = [sys.executable, "-m", "cmsf_tf.train", *TINY, f"--data_dir={fmnist_slice}", f"--model_dir={d}",
            "--epochs=2", "--steps_per_epoch=16", "--checkpoint_steps=0", "--noknn_eval"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = threading.Event()
    stderr, stdout = [], []

    def read_stdout():
        for line in proc.stdout:
            stdout.append(line)
            if line.startswith("Epoch 1/2"):  # Keras prints it as the first epoch starts
                started.set()

    threading.Thread(target=read_stdout, daemon=True).start()
    threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True).start()
    assert started.wait(300), "training did not start"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(300) == 143
    text = "".join(stderr) + "".join(stdout)
    assert "Traceback" not in text, text[-2000:]
    assert "stopped by SIGTERM at step" in text and "run the same command again to resume" in text
    step = checkpoints(d)[-1]
    assert 0 < step < 32  # saved at the step boundary after the signal (--checkpoint_steps=0: epoch ends only)
    out = train(f"--data_dir={fmnist_slice}", f"--model_dir={d}", "--epochs=2", "--steps_per_epoch=16",
                "--checkpoint_steps=0", "--noknn_eval")
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resumed from {d / 'checkpoints' / f'ckpt-{step}'} (step {step}," in out.stdout
    result = json.loads((d / "result.json").read_text())
    assert result["steps"] == 32
    # Both processes' training time: the stopped one wrote its stretch as it stopped.
    stretches = [json.loads(line) for line in (d / "training_time.jsonl").read_text().splitlines()]
    assert len({r["stretch"] for r in stretches}) == 2 and result["train_processes"] == 2
    last = {r["stretch"]: r for r in stretches}
    first, second = sorted(last.values(), key=lambda r: r["first_step"])
    assert (first["first_step"], first["step"], second["first_step"], second["step"]) == (0, step, step, 32)
    assert result["train_seconds_total"] == round(first["seconds"] + second["seconds"], 1)
    assert second["seconds"] < result["train_seconds_total"] <= result["wall_time_s"] + first["seconds"]
    # Both ran the CPU kernels this process runs (the environment they inherit decides).
    from cmsf_tf import distribute

    assert result["train_cpu_kernels"] == ["onednn" if distribute.onednn_on() else "eigen"]


def test_rerunning_a_finished_run_says_so_and_leaves_its_result(finished, tmp_path, fmnist_slice):
    d = copy_run(finished, tmp_path, drop_result=False)
    before = (d / "result.json").read_bytes()
    out = train(f"--data_dir={fmnist_slice}", f"--model_dir={d}", *FLAGS)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "is finished (step 8 of 8)" in out.stdout and "resumed" not in out.stdout
    assert (d / "result.json").read_bytes() == before
    assert "train_images_per_s" in json.loads(before)


def test_no_empty_table_and_no_cuda_error_line_on_a_cpu_machine(tmp_path, fmnist_slice):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = REPO
    out = subprocess.run([sys.executable, "-m", "cmsf_tf.train", *TINY, f"--data_dir={fmnist_slice}",
                          f"--model_dir={tmp_path / 'run'}", "--epochs=1", "--steps_per_epoch=1", "--noknn_eval"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "k-NN top-1" not in out.stdout
    if not os.path.exists("/dev/nvidiactl"):
        assert "cuInit" not in out.stderr and "cuda" not in out.stderr.lower(), out.stderr[-2000:]


def test_deterministic_runs_of_the_demo_network_are_bit_identical_and_so_is_a_resumed_one(tmp_path):
    """flags/demo.cfg's network (ResNet-18 width 16, batch 256) with --deterministic: two runs and a run
    stopped after step 5 and resumed end with the same bits in every variable, bank included. (Before
    the inter-op pool was pinned, the loss differed in the 4th decimal and the bank by 0.064.)"""
    from tests.conftest import run_cli

    flags = ["--flagfile=flags/demo.cfg", "--epochs=2", "--steps_per_epoch=6", "--bank_size=1024", "--deterministic",
             "--noknn_eval", "--noknn_baselines"]
    for name, extra in (("a", ()), ("b", ()), ("c", ("--checkpoint_steps=4", "--stop_after_steps=5")),
                        ("c", ("--checkpoint_steps=4",))):
        out = run_cli("cmsf_tf.train", *flags, f"--model_dir={tmp_path / name}", *extra)
        assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from" in out.stdout and "(step 5, epoch 1 of 2);" in out.stdout
    states = []
    for name in "abc":
        reader = tf.train.load_checkpoint(str(tmp_path / name / "checkpoints"))
        states.append({n: reader.get_tensor(n) for n in reader.get_variable_to_shape_map()
                       if not n.startswith(("_CHECKPOINTABLE_OBJECT_GRAPH", "save_counter"))})
    assert any("bank" in n and "embeddings" in n for n in states[0])
    for other in states[1:]:
        assert other.keys() == states[0].keys()
        for n in states[0]:
            np.testing.assert_array_equal(other[n], states[0][n], err_msg=n)


def test_discard_unstarted_removes_only_what_a_refused_run_wrote(tmp_path):
    fresh = RunDir(str(tmp_path / "fresh"))
    os.makedirs(fresh.path)
    fresh.write_flags({"method": "msf"})
    handle = fresh.lock()
    assert fresh.discard_unstarted(created=True)
    handle.close()
    assert not os.path.exists(fresh.path)

    started = RunDir(str(tmp_path / "started"))  # anything beyond flags and lock: a run, kept whole
    os.makedirs(started.tensorboard)
    started.write_flags({"method": "msf"})
    assert not started.discard_unstarted(created=True)
    assert sorted(os.listdir(started.path)) == ["flags.json", "tensorboard"]

    users = RunDir(str(tmp_path / "users"))  # made by the user before the run: emptied, not removed
    os.makedirs(users.path)
    users.write_flags({"method": "msf"})
    assert users.discard_unstarted(created=False)
    assert os.listdir(users.path) == []
    assert not RunDir(str(tmp_path / "missing")).discard_unstarted(created=True)


def test_training_time_sums_the_last_line_of_every_process_and_survives_a_kill(tmp_path):
    """monitor.TrainingTime on a fake clock: two processes, the first killed outright (no closing line)
    after its epoch-2 line; the totals count what each process last wrote."""
    from cmsf_tf.callbacks import monitor

    class Model:  # global_step reads train_steps
        def __init__(self, step):
            self.train_steps = tf.Variable(step, dtype=tf.int64)

    path = str(tmp_path / RunDir.TRAINING_TIME)
    now = [100.0]
    first = monitor.TrainingTime(path, 0, clock=lambda: now[0], cpu_kernels="eigen")
    first.set_model(Model(0))
    for epoch, seconds in ((0, 30.0), (1, 61.5)):
        now[0] += seconds
        first.model.train_steps.assign((epoch + 1) * 10)
        first.on_epoch_end(epoch)
    now[0] += 7.0  # trained on after the epoch-2 line, then killed -9: not recorded, and redone
    second = monitor.TrainingTime(path, 20, clock=lambda: now[0], cpu_kernels="onednn")  # resumed with oneDNN on
    second.stretch += "-second"  # the same process id in this test
    second.set_model(Model(20))
    now[0] += 25.0
    second.record(30)

    records = monitor.read_jsonl(path, key="stretch")
    assert [(r["first_step"], r["step"], r["seconds"]) for r in sorted(records, key=lambda r: r["first_step"])] == [
        (0, 20, 91.5), (20, 30, 25.0)]
    assert monitor.training_time(records) == {"train_seconds_total": 116.5, "train_processes": 2,
                                              "train_cpu_kernels": ["eigen", "onednn"]}
    assert monitor.training_time([]) == {}
    # Lines from before the kernels were recorded count for the time and say nothing of the kernels.
    old = [{k: v for k, v in r.items() if k != "cpu_kernels"} for r in records]
    assert monitor.training_time(old) == {"train_seconds_total": 116.5, "train_processes": 2, "train_cpu_kernels": []}
    # A torn last line (killed mid-write) is skipped.
    with open(path, "a") as f:
        f.write('{"stretch": "x", "first_st')
    assert monitor.training_time(monitor.read_jsonl(path, key="stretch"))["train_processes"] == 2
