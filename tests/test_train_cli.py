"""python -m cmsf_tf.train end to end on a slice of the real Fashion-MNIST: files, resume, bad input."""

import json
import os
import re

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import TINY, read_events, run_cli


def train(*args, timeout=600):
    return run_cli("cmsf_tf.train", *TINY, *args, timeout=timeout)


def assert_one_sentence_error(out, pattern):
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    assert re.search(pattern, out.stderr), out.stderr[-2000:]


def test_end_to_end_run_leaves_its_files(tmp_path, fmnist_slice):
    model_dir = tmp_path / "run"
    out = train(f"--data_dir={fmnist_slice}", f"--model_dir={model_dir}", "--epochs=2", "--steps_per_epoch=3")
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((model_dir / "flags.json").read_text())["method"] == "msf"
    assert tf.train.latest_checkpoint(str(model_dir / "checkpoints")).endswith("ckpt-6")
    result = json.loads((model_dir / "result.json").read_text())
    for key in ("knn_top1_k1", "knn_top1_k20"):
        assert 0.0 <= result[key] <= 1.0
    assert result["steps"] == 6 and result["wall_time_s"] > 0 and result["train_images_per_s"] > 0
    # TensorBoard: step-level scalars read back from the event files.
    acc = read_events(str(model_dir / "tensorboard"))
    tags = acc.Tags()["tensors"]
    for tag in ("train/loss", "train/purity", "train/lr", "epoch/loss"):
        assert tag in tags, tags
    losses = [float(tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors("train/loss")]
    assert [e.step for e in acc.Tensors("train/loss")] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(losses))


def checkpoint_state(model_dir):
    """All variables of the newest checkpoint, by name."""
    reader = tf.train.load_checkpoint(str(model_dir / "checkpoints"))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if not name.startswith(("_CHECKPOINTABLE_OBJECT_GRAPH", "save_counter"))}


PSEUDO_FLAGS = ["--method=cmsf_pseudo", "--label_split=percent:25", "--labelled_cache_size=64", "--pseudo_epochs=2",
                "--pseudo_lr=0.1", "--conf_threshold=0.5"]
METHOD_FLAGS = {"msf": [], "cmsf_2q": ["--method=cmsf_2q", "--topk_prime=4"],
                "cmsf_km": ["--method=cmsf_km", "--num_clusters=4", "--kmeans_iters=3"],
                "cmsf_sup": ["--method=cmsf_sup", "--label_noise=25"],
                "xent": ["--method=xent", "--label_noise=25"],
                "cmsf_pseudo": PSEUDO_FLAGS,
                "cmsf_2q_multi_crop": ["--method=cmsf_2q", "--topk_prime=4", "--multi_crop=2:14:0.1:0.4"]}
PER_IMAGE_STATE = {"msf": (), "cmsf_2q": ("pool", "previous_bank"), "cmsf_km": ("pool", "cluster_ids"),
                   "cmsf_sup": (), "xent": (), "cmsf_pseudo": ("pseudo_head", "labelled_cache"),
                   "cmsf_2q_multi_crop": ("pool", "previous_bank")}


@pytest.mark.parametrize("method", ["msf", "cmsf_2q", "cmsf_km", "cmsf_sup", "xent", "cmsf_pseudo",
                                    "cmsf_2q_multi_crop"])
def test_resume_mid_epoch_continues_exactly(tmp_path, fmnist_slice, method):
    flags = [f"--data_dir={fmnist_slice}", "--epochs=2", "--steps_per_epoch=4", "--deterministic",
             "--noknn_eval", *METHOD_FLAGS[method]]
    straight = tmp_path / "straight"
    out = train(*flags, f"--model_dir={straight}")
    assert out.returncode == 0, out.stderr[-3000:]

    resumed = tmp_path / "resumed"
    out = train(*flags, f"--model_dir={resumed}", "--checkpoint_steps=3", "--stop_after_steps=6")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "stopped at step 6" in out.stdout + out.stderr
    assert not (resumed / "result.json").exists()
    out = train(*flags, f"--model_dir={resumed}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from" in out.stdout + out.stderr and "step 6, epoch 2" in out.stdout + out.stderr

    a, b = checkpoint_state(straight), checkpoint_state(resumed)
    assert a.keys() == b.keys()
    names = list(a)
    # The state that must continue: bank rows, labels, ids and pointer, optimizer iterations and slots.
    state_keys = ("optimizer/iterations",) if method == "xent" else (
        "bank/embeddings", "bank/pointer", "bank/image_indices", "optimizer/iterations")
    for key in state_keys:
        assert any(key.split("/")[0] in n and key.split("/")[1] in n for n in names), key
    for key in PER_IMAGE_STATE[method]:  # the per-image pool and cluster ids are checkpointed too
        assert any(key in n for n in names), key
    if method == "cmsf_km":
        ids = [v for n, v in a.items() if "cluster_ids" in n][0]
        assert ids.max() >= 0  # clustered at the end of epoch 1, kept through the resume
    for name in names:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-6, atol=1e-7, err_msg=name)
    assert [v for n, v in a.items() if "iter" in n][0] == 8


def test_deterministic_with_onednn_on_a_cpu_without_avx512_says_it_cannot_hold(tmp_path, fmnist_slice):
    """Where oneDNN's kernels cannot keep --deterministic (docs/resume.md), the run says so in a line."""
    from cmsf_tf import distribute

    out = run_cli("cmsf_tf.train", *TINY, f"--data_dir={fmnist_slice}", f"--model_dir={tmp_path / 'run'}", "--epochs=1",
                  "--steps_per_epoch=1", "--deterministic", "--noknn_eval", env={"TF_ENABLE_ONEDNN_OPTS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    flagged = "warning: --deterministic with TensorFlow's oneDNN CPU kernels" in out.stdout + out.stderr
    assert flagged == distribute.nondeterministic_cpu_kernels(True, distribute.cpu_flags())
    assert "note: TensorFlow runs its Eigen CPU kernels" not in out.stdout + out.stderr


def test_a_run_on_eigen_kernels_of_an_x86_cpu_names_the_faster_kernels(tmp_path, fmnist_slice):
    """Without --deterministic and without TF_ENABLE_ONEDNN_OPTS (empty is TensorFlow's default), a run that
    TensorFlow put on Eigen's kernels says in one line that oneDNN's are faster; a run that chose says nothing."""
    from cmsf_tf import distribute

    for value in ("", "0"):
        run = tmp_path / f"run{value}"
        out = run_cli("cmsf_tf.train", *TINY, f"--data_dir={fmnist_slice}", f"--model_dir={run}", "--epochs=1",
                      "--steps_per_epoch=1", "--noknn_eval", env={"TF_ENABLE_ONEDNN_OPTS": value})
        assert out.returncode == 0, out.stderr[-3000:]
        noted = [line for line in (out.stdout + out.stderr).splitlines() if "TF_ENABLE_ONEDNN_OPTS=1" in line]
        kernels = json.loads((run / "result.json").read_text())["train_cpu_kernels"]
        expected = value == "" and kernels == ["eigen"] and distribute.cpu_flags() is not None
        assert len(noted) == int(expected), (value, kernels, noted)


def one_device_and_two_replicas(tmp_path, fmnist_slice, *flags):
    """Checkpoint states after one epoch of the same run on one device and on 2 mirrored CPU replicas."""
    flags = [f"--data_dir={fmnist_slice}", *flags, "--epochs=1", "--noknn_eval", "--deterministic"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert train(*flags, f"--model_dir={one}").returncode == 0
    out = train(*flags, f"--model_dir={two}", "--strategy=mirrored", "--cpu_devices=2")
    assert out.returncode == 0, out.stderr[-3000:]
    return checkpoint_state(one), checkpoint_state(two)


@pytest.mark.parametrize("method", ["cmsf_2q", "cmsf_km"])
def test_two_replicas_keep_the_per_image_state_of_one_device(tmp_path, fmnist_slice, method):
    """The pools (and k-means ids) are ONLY_FIRST_REPLICA variables written with gathered rows: under 2
    replicas they must hold what one device holds, every image of the batch included."""
    a, b = one_device_and_two_replicas(tmp_path, fmnist_slice, *METHOD_FLAGS[method], "--steps_per_epoch=1")
    writes = [n for n in a if "pool" in n and "writes" in n][0]
    np.testing.assert_array_equal(a[writes], b[writes])
    assert a[writes].sum() == 32  # the whole global batch, once
    pool = [n for n in a if "pool" in n and "embeddings" in n][0]
    np.testing.assert_allclose(a[pool], b[pool], atol=1e-3)
    if method == "cmsf_km":
        ids = [n for n in a if "cluster_ids" in n][0]
        assert (a[ids] >= 0).sum() == (b[ids] >= 0).sum() == 32  # clustered under the strategy too


def test_two_replicas_keep_the_pseudo_label_head_and_cache_of_one_device(tmp_path, fmnist_slice):
    """The cache is written with gathered rows and the head is trained outside the strategy and written
    back: two replicas must end with one device's cache and (nearly) its head."""
    a, b = one_device_and_two_replicas(tmp_path, fmnist_slice, *PSEUDO_FLAGS, "--steps_per_epoch=2")
    labels = [n for n in a if "labelled_cache" in n and "labels" in n][0]
    np.testing.assert_array_equal(a[labels], b[labels])
    assert (a[labels] >= 0).sum() > 0
    cache = [n for n in a if "labelled_cache" in n and "embeddings" in n][0]
    # Step 2's targets follow step 1's update, which two replicas compute to a few % (see the mirrored
    # step test); a cache row that belonged to another image would be off by ~1.
    np.testing.assert_allclose(a[cache], b[cache], atol=5e-3)
    head = [n for n in a if "pseudo_head" in n and "kernel" in n and "optimizer" not in n]
    assert head
    for name in head:
        np.testing.assert_allclose(a[name], b[name], atol=2e-2, err_msg=name)


@pytest.mark.parametrize("flag,pattern", [
    ("--method=simclr", r"unknown --method 'simclr'"),
    ("--arch=vgg", r"unknown --arch 'vgg'"),
    ("--dataset=mnist", r"unknown --dataset 'mnist'"),
    ("--bank_size=100", r"--bank_size 100 is not a multiple of the global --batch_size 32"),
    ("--topk=500", r"--topk 500 is larger than --bank_size 128"),
    ("--method=cmsf_2q --topk_prime=2", r"--topk_prime 2 must be at least --topk 3"),
    ("--pool_dtype=float16", r"unknown --pool_dtype 'float16'"),
    ("--learning_rate=inf", r"--learning_rate must be a finite number \(got inf\)"),
    ("--weight_decay=nan", r"--weight_decay must be a finite number \(got nan\)"),
    ("--data_dir=/nonexistent/fmnist", r"--data_dir /nonexistent/fmnist does not exist"),
    ("--strategy=mirrored --cpu_devices=2 --jit_compile=true",
     r"--jit_compile=true cannot compile under --strategy=mirrored: .*merge_call"),
    ("--deterministic --jit_compile=true", r"--jit_compile=true cannot be combined with --deterministic"),
])
def test_bad_flag_values_fail_with_one_sentence(tmp_path, fmnist_slice, flag, pattern):
    args = [f"--data_dir={fmnist_slice}", f"--model_dir={tmp_path / 'run'}", *flag.split()]
    assert_one_sentence_error(train(*args), pattern)


def test_empty_data_dir_fails_clearly(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = train(f"--data_dir={empty}", f"--model_dir={tmp_path / 'run'}")
    assert_one_sentence_error(out, r"does not hold Fashion-MNIST: missing")
    assert not (tmp_path / "run").exists()  # refused before its first step: no directory that looks like a run
    kept = tmp_path / "kept"  # a directory the user made stays, emptied of what the refused run wrote
    kept.mkdir()
    assert_one_sentence_error(train(f"--data_dir={empty}", f"--model_dir={kept}"), r"does not hold Fashion-MNIST")
    assert kept.is_dir() and os.listdir(kept) == []


def test_unwritable_model_dir_fails_clearly(tmp_path, fmnist_slice):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    out = train(f"--data_dir={fmnist_slice}", f"--model_dir={blocker / 'run'}")
    assert_one_sentence_error(out, r"cannot write to --model_dir")


def test_missing_flagfile_and_unknown_flag_fail_clearly(tmp_path):
    out = run_cli("cmsf_tf.train", f"--flagfile={tmp_path / 'nope.cfg'}", f"--model_dir={tmp_path}")
    assert_one_sentence_error(out, r"Unable to open flagfile")
    bad = tmp_path / "bad.cfg"
    bad.write_text("--method=msf\n--no_such_flag=3\n")
    out = run_cli("cmsf_tf.train", f"--flagfile={bad}", f"--model_dir={tmp_path}")
    assert_one_sentence_error(out, r"Unknown command line flag 'no_such_flag'")


def test_nan_loss_stops_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path, fmnist_slice):
    model_dir = tmp_path / "run"
    out = train(f"--data_dir={fmnist_slice}", f"--model_dir={model_dir}", "--learning_rate=1e30",
                "--checkpoint_steps=1", "--epochs=3")
    # The loss of step N is computed before step N's update, so a state can turn non-finite one step before
    # its loss does: the saver refuses that state first (tests/test_rundir.py checks what stays saved).
    assert_one_sentence_error(out, r"(the loss became (nan|inf|-inf) at|the state after) step \d+")
    bad_step = int(re.search(r"step (\d+)", out.stderr).group(1))
    saved = [int(p.split("-")[-1].split(".")[0]) for p in os.listdir(model_dir / "checkpoints") if p.startswith("ckpt-")]
    assert all(s < bad_step for s in saved), (saved, bad_step)
    assert not (model_dir / "result.json").exists()


def test_resume_refuses_a_different_run(tmp_path, fmnist_slice):
    model_dir = tmp_path / "run"
    out = train(f"--data_dir={fmnist_slice}", f"--model_dir={model_dir}", "--epochs=1", "--steps_per_epoch=1",
                "--noknn_eval")
    assert out.returncode == 0, out.stderr[-2000:]
    out = train(f"--data_dir={fmnist_slice}", f"--model_dir={model_dir}", "--epochs=1", "--steps_per_epoch=1",
                "--width=8")
    assert_one_sentence_error(out, r"holds a run with --width=4, but this one asks for --width=8")


def test_two_replica_mirrored_step_matches_single_device(tmp_path, fmnist_slice):
    """--strategy=mirrored over 2 logical CPU devices takes the single-device step: same batches into the
    bank in the same order, same targets, same summed gradient (loss / replicas + synchronized BN)."""
    flags = [f"--data_dir={fmnist_slice}", "--method=byol", "--topk=1", "--epochs=1", "--steps_per_epoch=1",
             "--noknn_eval", "--deterministic"]
    one, two = tmp_path / "one", tmp_path / "two"
    out = train(*flags, f"--model_dir={one}")
    assert out.returncode == 0, out.stderr[-3000:]
    out = train(*flags, f"--model_dir={two}", "--strategy=mirrored", "--cpu_devices=2")
    assert out.returncode == 0, out.stderr[-3000:]
    a, b = checkpoint_state(one), checkpoint_state(two)
    ids = [n for n in a if "bank" in n and "image_indices" in n][0]
    np.testing.assert_array_equal(a[ids], b[ids])  # both replicas' rows, in replica order
    bank = [n for n in a if "bank" in n and "embeddings" in n][0]
    np.testing.assert_allclose(a[bank], b[bank], atol=1e-3)
    # After one step the SGD momentum slots are -lr * gradient. A missing "/ replicas" doubles them and
    # unsynchronized BatchNorm changes every layer's gradient. The gradient of this tiny network at
    # initialisation is numerically touchy: merely swapping the two halves of the batch on one device
    # moves it by 0.8% (relative L2), and the 2-replica step (other summation orders, E[x^2]-E[x]^2 in
    # synchronized BN) by 3-6% depending on the views drawn, so the bound is 10%: a missing "/ replicas"
    # is 100%, and unsynchronized BN already fails the target check above.
    slots = sorted(n for n in a if n.startswith("optimizer/_variables") and np.ndim(a[n]) > 0)
    ga = np.concatenate([a[n].ravel() for n in slots])
    gb = np.concatenate([b[n].ravel() for n in slots])
    print("relative gradient difference", np.linalg.norm(ga - gb) / np.linalg.norm(ga))
    assert np.linalg.norm(ga - gb) / np.linalg.norm(ga) < 0.10
    assert abs(np.dot(ga, gb) / np.dot(gb, gb) - 1) < 0.10


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_mixed_precision_runs_finite_with_a_float32_bank(tmp_path, fmnist_slice, precision):
    model_dir = tmp_path / precision
    # CMSF-Pseudo: the MeanShift step plus the pseudo-label head, its rounds and the labelled cache.
    out = train(f"--data_dir={fmnist_slice}", f"--model_dir={model_dir}", "--epochs=2", "--steps_per_epoch=3",
                f"--mixed_precision={precision}", "--noknn_eval", *PSEUDO_FLAGS)
    assert out.returncode == 0, out.stderr[-3000:]
    # Steps count batches, also when float16 loss scaling skips an overflowing update.
    assert tf.train.latest_checkpoint(str(model_dir / "checkpoints")).endswith("ckpt-6")
    state = checkpoint_state(model_dir)
    bank = [n for n in state if "bank" in n and "embeddings" in n][0]
    assert state[bank].dtype == np.float32 and np.isfinite(state[bank]).all()
    kernels = [v for n, v in state.items() if "kernel" in n and "optimizer" not in n]
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in kernels)
    cache = [v for n, v in state.items() if "labelled_cache" in n and "embeddings" in n][0]
    assert cache.dtype == np.float32 and np.isfinite(cache).all() and np.abs(cache).sum() > 0
    assert any("pseudo_head" in n for n in state)


def test_multi_crop_trains_on_two_replicas_in_mixed_precision(tmp_path, fmnist_slice):
    """--multi_crop under MirroredStrategy (2 logical devices) and bfloat16: the small crops split over the
    replicas with their images, the run ends finite, and its loss is the multi-view one (it differs from
    the same run without small crops from the first step on)."""
    flags = [f"--data_dir={fmnist_slice}", "--epochs=1", "--steps_per_epoch=2", "--noknn_eval", "--deterministic",
             "--strategy=mirrored", "--cpu_devices=2", "--mixed_precision=bfloat16"]
    losses = {}
    for name, extra in (("small", ["--multi_crop=3:14:0.1:0.4"]), ("plain", [])):
        out = train(*flags, *extra, f"--model_dir={tmp_path / name}")
        assert out.returncode == 0, out.stderr[-3000:]
        state = checkpoint_state(tmp_path / name)
        assert all(np.isfinite(v).all() for v in state.values() if v.dtype.kind == "f")
        acc = read_events(str(tmp_path / name / "tensorboard"))
        losses[name] = [float(tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors("train/loss")]
    assert len(losses["small"]) == 2 and losses["small"][0] != losses["plain"][0]
    assert json.loads((tmp_path / "small" / "flags.json").read_text())["multi_crop"] == "3:14:0.1:0.4"


def test_supervised_cmsf_with_label_noise_through_the_cli(tmp_path, fmnist_slice):
    model_dir = tmp_path / "sup"
    out = train(f"--data_dir={fmnist_slice}", f"--model_dir={model_dir}", "--method=cmsf_sup", "--label_noise=25",
                "--epochs=1", "--steps_per_epoch=4")
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((model_dir / "result.json").read_text())["method"] == "cmsf_sup"
    acc = read_events(str(model_dir / "tensorboard"))
    label_purity = [float(tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors("train/label_purity")]
    purity = [float(tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors("train/purity")]
    # Neighbours share the (noisy) training label; against the truth the noise shows.
    assert label_purity[-1] > 0.9 and purity[-1] < label_purity[-1]


def test_cross_entropy_baseline_through_the_cli_with_noisy_labels(tmp_path, fmnist_slice):
    model_dir = tmp_path / "xent"
    out = train(f"--data_dir={fmnist_slice}", f"--model_dir={model_dir}", "--method=xent", "--label_noise=25",
                "--epochs=3", "--steps_per_epoch=8", "--learning_rate=0.1")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((model_dir / "result.json").read_text())
    assert result["method"] == "xent" and result["knn_top1_k20"] > 0.3
    acc = read_events(str(model_dir / "tensorboard"))
    tags = acc.Tags()["tensors"]
    for tag in ("train/loss", "train/train_top1", "train/train_top1_true", "epoch/train_top1"):
        assert tag in tags, tags
    assert "train/purity" not in tags  # no bank, no neighbours
    # The run evaluates and exports like any other: the backbone is online_backbone.
    out = run_cli("cmsf_tf.evaluate", "knn", f"--model_dir={model_dir}", "--knn_k=1")
    assert out.returncode == 0, out.stderr[-3000:]
    knn1 = json.loads((model_dir / "eval" / "knn.json").read_text())["knn_top1_k1"]
    assert knn1 == pytest.approx(result["knn_top1_k1"], abs=1 / 256)


@pytest.mark.parametrize("flag,pattern", [
    ("--label_noise=100", r"--label_noise must be in \[0, 100\)"),
    ("--label_split=ten", r"--label_split 'ten' is neither percent:P"),
])
def test_bad_label_flags(tmp_path, fmnist_slice, flag, pattern):
    assert_one_sentence_error(train(f"--data_dir={fmnist_slice}", f"--model_dir={tmp_path}", flag), pattern)


def free_ports(n):
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def start_workers(flags, model_dir, n=2):
    """`n` worker processes of one MultiWorkerMirroredStrategy run on 127.0.0.1 sharing `model_dir`."""
    import subprocess
    import sys

    from tests.conftest import REPO

    workers = [f"127.0.0.1:{p}" for p in free_ports(n)]
    procs = []
    for index in range(n):
        tf_config = json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})
        env = dict(os.environ, TF_CONFIG=tf_config, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "cmsf_tf.train", *flags, "--strategy=multi_worker", f"--model_dir={model_dir}"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def wait_workers(procs, timeout=300):
    """The workers' (stdout, stderr), once all have exited; kills them all if one hangs."""
    import subprocess

    try:
        return [p.communicate(timeout=timeout) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        tails = [p.communicate()[1][-1500:] for p in procs]
        raise AssertionError("workers hung:\n" + "\n-----\n".join(tails)) from None


def test_two_worker_processes_train_like_one_device(tmp_path, fmnist_slice):
    """MultiWorkerMirroredStrategy with 2 processes on 127.0.0.1 sharing one --model_dir."""
    flags = [*TINY, f"--data_dir={fmnist_slice}", "--epochs=1", "--steps_per_epoch=3", "--noknn_eval"]
    single = tmp_path / "single"
    out = train(*flags[len(TINY):], f"--model_dir={single}")
    assert out.returncode == 0, out.stderr[-3000:]

    shared = tmp_path / "multi"
    procs = start_workers(flags, shared)
    for p, (_, err) in zip(procs, wait_workers(procs, timeout=240)):
        assert p.returncode == 0, err[-3000:]
    assert json.loads((shared / "result.json").read_text())["steps"] == 3  # written by the chief only
    a, b = checkpoint_state(single), checkpoint_state(shared)
    ids = [n for n in a if "bank" in n and "image_indices" in n][0]
    np.testing.assert_array_equal(a[ids], b[ids])  # both workers' rows, every batch exactly once
    bank = [n for n in a if "bank" in n and "embeddings" in n][0]
    np.testing.assert_allclose(a[bank][:32], b[bank][:32], atol=1e-3)  # step 1: same targets


def test_sigterm_to_one_worker_stops_every_worker_at_one_checkpoint_that_resumes_exactly(tmp_path, fmnist_slice):
    """A preempted worker (SIGTERM to the non-chief only): both workers save the same mid-epoch step and exit
    143 within a bounded time; the rerun on 2 workers, and on 2 replicas of one process, ends with the
    variables of an uninterrupted run (--deterministic: bit for bit, as a resume on the same layout)."""
    import shutil
    import signal
    import time

    steps_per_epoch, total = 10, 20
    flags = [*TINY, f"--data_dir={fmnist_slice}", "--epochs=2", f"--steps_per_epoch={steps_per_epoch}",
             "--noknn_eval", "--deterministic", "--checkpoint_steps=2"]
    straight = tmp_path / "straight"
    procs = start_workers(flags, straight)
    for p, (_, err) in zip(procs, wait_workers(procs)):
        assert p.returncode == 0, err[-3000:]

    stopped = tmp_path / "stopped"
    procs = start_workers(flags, stopped)
    first = stopped / "checkpoints" / "ckpt-2.index"  # training is under way on both workers
    deadline = time.time() + 240
    while not first.exists() and time.time() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.1)
    assert first.exists(), wait_workers(procs)[0][1][-3000:]
    procs[1].send_signal(signal.SIGTERM)
    signalled = time.time()
    outs = wait_workers(procs, timeout=120)
    exit_seconds = time.time() - signalled
    print(f"both workers exited {exit_seconds:.1f} s after the SIGTERM")
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 143, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
    logs = [out + err for out, err in outs]
    saved = [int(m) for m in re.findall(r"every worker saved step (\d+) of", "".join(logs))]
    assert len(saved) == 2 and saved[0] == saved[1], [log[-1500:] for log in logs]
    step = saved[0]
    assert "stopped by SIGTERM" in logs[1] and "stopped by another worker's stop" in logs[0]
    assert tf.train.latest_checkpoint(str(stopped / "checkpoints")).endswith(f"ckpt-{step}")
    assert 2 < step < total and step % steps_per_epoch, step  # a mid-epoch checkpoint, not a periodic one
    assert not (stopped / "result.json").exists()

    one_process = tmp_path / "one_process"
    shutil.copytree(stopped, one_process)
    procs = start_workers(flags, stopped)
    outs = wait_workers(procs)
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert f"(step {step}, epoch" in outs[0][0] + outs[0][1]
    out = train(*flags[len(TINY):], f"--model_dir={one_process}", "--strategy=mirrored", "--cpu_devices=2")
    assert out.returncode == 0, out.stderr[-3000:]

    a = checkpoint_state(straight)
    for resumed in (stopped, one_process):
        b = checkpoint_state(resumed)
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_allclose(a[name], b[name], rtol=1e-6, atol=1e-7, err_msg=f"{resumed.name}: {name}")
    assert [v for n, v in a.items() if "iter" in n][0] == total


def relative_difference(a, b, names):
    """|a - b| / |a| over the concatenation of the named arrays."""
    x = np.concatenate([a[n].ravel() for n in names]).astype(np.float64)
    y = np.concatenate([b[n].ravel() for n in names]).astype(np.float64)
    return np.linalg.norm(x - y) / np.linalg.norm(x)


def test_a_run_resumes_on_another_replica_count_with_the_same_stream_and_state(tmp_path, fmnist_slice):
    """Elastic resume at the same global batch: 1 -> 2 and 2 -> 1 logical devices, CMSF-2Q (bank, pool and
    M' are ONLY_FIRST_REPLICA state written with gathered rows; SGD slots and BatchNorm statistics mirrored).
    A run stopped at step 3 on one layout and resumed on the other to step 6 (across the epoch boundary) is
    compared with the uninterrupted run on the first layout at step 6. The data stream does not depend on the
    replica count, so every index-valued variable (which image went into which bank and pool row, the pool's
    write counts, the step) must match exactly. The float state differs by reduction order only (one device
    sums the batch in one place, two sum halves and all-reduce them; synchronized BatchNorm computes
    E[x^2] - E[x]^2). Measured after the 3 steps on the new layout (relative L2): weights 1.7e-3 / 4.5e-3,
    bank rows 1.1e-3 / 3.5e-3, SGD momentum 12% / 18% (1 -> 2 / 2 -> 1; the momentum is the gradient, the
    touchiest quantity: see test_two_replica_mirrored_step_matches_single_device); bounded at 1e-2, 1e-2 and
    30%. The exact checks carry the test: a lost stream position or a mis-restored pool changes the ids.
    (Left to run 15 steps on the new layout, the trajectories drift apart as any two reduction orders do:
    2% in the weights, 12% in the bank rows.)"""
    flags = [f"--data_dir={fmnist_slice}", *METHOD_FLAGS["cmsf_2q"], "--epochs=2", "--steps_per_epoch=4",
             "--noknn_eval", "--deterministic"]
    layouts = {1: [], 2: ["--strategy=mirrored", "--cpu_devices=2"]}
    for start, then in ((1, 2), (2, 1)):
        straight, moved = tmp_path / f"straight{start}", tmp_path / f"moved{start}to{then}"
        for model_dir, layout, stop in ((straight, start, 6), (moved, start, 3), (moved, then, 6)):
            out = train(*flags, *layouts[layout], f"--model_dir={model_dir}", f"--stop_after_steps={stop}")
            assert out.returncode == 0, out.stderr[-3000:]
        assert "step 3, epoch 1" in out.stdout + out.stderr

        a, b = checkpoint_state(straight), checkpoint_state(moved)
        assert a.keys() == b.keys()
        exact = [n for n in a if a[n].dtype.kind in "iub"]
        assert any("image_indices" in n for n in exact) and any("pool" in n and "writes" in n for n in exact)
        for name in exact:
            np.testing.assert_array_equal(a[name], b[name], err_msg=f"{start} -> {then}: {name}")
        weights = [n for n in a if n.startswith("model/online") and a[n].dtype.kind == "f"]
        banks = [n for n in a if ("bank" in n or "pool" in n) and "embeddings" in n]
        slots = [n for n in a if n.startswith("optimizer/_variables") and np.ndim(a[n]) > 0]
        assert weights and slots and len(banks) == 3, banks  # bank, previous bank (M'), pool
        found = {k: relative_difference(a, b, names) for k, names in
                 (("weights", weights), ("banks", banks), ("slots", slots))}
        print(f"{start} -> {then}:", {k: f"{v:.2e}" for k, v in found.items()})
        assert found["weights"] < 1e-2 and found["banks"] < 1e-2 and found["slots"] < 0.3, found

    # A layout the global batch does not divide into is refused in one sentence.
    out = train(*flags, "--strategy=mirrored", "--cpu_devices=3", f"--model_dir={tmp_path / 'moved1to2'}")
    assert_one_sentence_error(out, r"--batch_size 32 is not divisible by the 3 replicas")


def test_cmsf_km_and_2q_log_their_metrics_to_tensorboard(tmp_path, fmnist_slice):
    import tensorflow as tf
    from tensorboard.backend.event_processing import event_accumulator

    for method in ("cmsf_km", "cmsf_2q"):
        model_dir = tmp_path / method
        out = train(f"--data_dir={fmnist_slice}", "--epochs=2", "--steps_per_epoch=2", "--noknn_eval",
                    *METHOD_FLAGS[method], f"--model_dir={model_dir}")
        assert out.returncode == 0, out.stderr[-3000:]
        tags = {}
        for root, _, files in os.walk(model_dir / "tensorboard"):
            if any("tfevents" in f for f in files):
                acc = event_accumulator.EventAccumulator(root, size_guidance={event_accumulator.TENSORS: 0})
                acc.Reload()
                tags.update({t: acc.Tensors(t) for t in acc.Tags()["tensors"]})
        assert "train/purity_unconstrained" in tags and "train/purity" in tags
        if method == "cmsf_km":
            assert "constraint is off (loss = MSF)" in out.stdout + out.stderr
            sizes = tf.make_ndarray(tags["kmeans/cluster_size"][-1].tensor_proto)
            assert sizes.shape[1] == 3 and sizes[:, 2].sum() == 4  # a histogram of the 4 cluster sizes
            assert [e.step for e in tags["epoch/kmeans_inertia"]] == [1, 2]
        else:
            ranks = [float(tf.make_ndarray(e.tensor_proto)) for e in tags["train/constrained_rank"]]
            assert all(r >= 0 for r in ranks)
        # The epoch's rank histogram: one record and one TensorBoard histogram per epoch, 2 steps x 32
        # queries x 3 neighbours counted each, whose mean is the epoch's constrained_rank.
        records = [json.loads(line) for line in (model_dir / "constrained_ranks.jsonl").read_text().splitlines()]
        assert [(r["epoch"], r["step"]) for r in records] == [(1, 2), (2, 4)]
        for record, logged in zip(records, tags["epoch/constrained_rank"]):
            counts = np.array(record["counts"])
            assert counts.sum() == 2 * 32 * 3
            assert np.isclose((counts * np.arange(len(counts))).sum() / counts.sum(),
                              float(tf.make_ndarray(logged.tensor_proto)), atol=1e-4)
        histograms = tags["constraint/rank_histogram"]
        assert [e.step for e in histograms] == [2, 4]  # keyed by the global step
        buckets = tf.make_ndarray(histograms[-1].tensor_proto)  # [bucket, (left, right, count)]
        assert buckets[:, 2].sum() == 2 * 32 * 3


def test_pseudo_label_rounds_fire_at_mid_epoch_and_epoch_end(tmp_path, fmnist_slice):
    model_dir = tmp_path / "pseudo"
    out = train(f"--data_dir={fmnist_slice}", f"--model_dir={model_dir}", "--epochs=2", "--steps_per_epoch=5",
                "--noknn_eval", *PSEUDO_FLAGS)
    assert out.returncode == 0, out.stderr[-3000:]
    acc = read_events(str(model_dir / "tensorboard"))
    # 5 steps per epoch: rounds after steps 2 and 5 of each epoch, nowhere else.
    assert [e.step for e in acc.Tensors("pseudo/head_train_top1")] == [2, 5, 7, 10]
    rows = [float(tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors("pseudo/cached_rows")]
    # The cache holds the labelled images of the batches so far (at most 64): count them in the stream.
    from cmsf_tf import config, train as training
    from cmsf_tf.data import pipeline, sources

    source = sources.load("fashion_mnist", fmnist_slice)
    labelled = training.training_labels(config.make(label_split="percent:25"), source).labels >= 0
    seen = np.concatenate([labelled[pipeline.epoch_order(512, 0, e).numpy()[:5 * 32]] for e in (0, 1)])
    assert rows == [float(min(64, seen[:s * 32].sum())) for s in (2, 5, 7, 10)]
    for tag in ("train/pseudo_accuracy", "train/confident_fraction", "train/purity_unconstrained"):
        assert tag in acc.Tags()["tensors"], tag


def test_semi10_fmnist_recipe_runs_through_the_cli(tmp_path, fmnist_slice):
    model_dir = tmp_path / "semi10"
    out = run_cli("cmsf_tf.train", "--flagfile=flags/semi10_fmnist.cfg", f"--data_dir={fmnist_slice}",
                  f"--model_dir={model_dir}", "--epochs=1", "--width=4", "--bank_size=512")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((model_dir / "result.json").read_text())
    assert result["method"] == "cmsf_pseudo" and result["steps"] == 2  # 512 images, batch 256
    flags = json.loads((model_dir / "flags.json").read_text())
    assert flags["label_split"] == "percent:10" and flags["topk"] == 10 and flags["conf_threshold"] == 0.85


def test_cmsf_pseudo_without_a_label_split_is_refused(tmp_path, fmnist_slice):
    out = train(f"--data_dir={fmnist_slice}", f"--model_dir={tmp_path}", "--method=cmsf_pseudo")
    assert_one_sentence_error(out, "--method=cmsf_pseudo needs --label_split")


def test_knn_every_writes_a_curve_that_a_resumed_run_continues(tmp_path, fmnist_slice):
    """--knn_every: k-NN on a fixed test subset at the chosen epochs and the last, into knn_curve.jsonl,
    TensorBoard eval/knn_* at the global step and result.json; the last point is the final k-NN when the
    subsets are whole; a run stopped at an epoch end measures that epoch when it resumes."""
    model_dir = tmp_path / "run"
    flags = [f"--data_dir={fmnist_slice}", f"--model_dir={model_dir}", "--epochs=3", "--steps_per_epoch=2",
             "--knn_every=2", "--knn_every_queries=0"]
    out = train(*flags, "--stop_after_steps=4", "--checkpoint_steps=2")
    assert out.returncode == 0, out.stderr[-3000:]
    curve = [json.loads(line) for line in (model_dir / "knn_curve.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"], r["queries"], r["index"]) for r in curve] == [(2, 4, 256, 512)]
    (model_dir / "knn_curve.jsonl").write_text("")  # as if killed before the epoch-2 evaluation was written
    out = train(*flags)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "epoch 2: k-NN top-1" in out.stdout + out.stderr  # measured again on resume
    result = json.loads((model_dir / "result.json").read_text())
    assert [(r["epoch"], r["step"]) for r in result["knn_curve"]] == [(2, 4), (3, 6)]
    last = result["knn_curve"][-1]
    assert (last["knn_top1_k1"], last["knn_top1_k20"]) == (result["knn_top1_k1"], result["knn_top1_k20"])
    acc = read_events(str(model_dir / "tensorboard"))
    assert sorted({e.step for e in acc.Tensors("eval/knn_top1_k20")}) == [4, 6]  # step 4 twice: measured again
    assert float(tf.make_ndarray(acc.Tensors("eval/knn_top1_k1")[-1].tensor_proto)) == pytest.approx(result["knn_top1_k1"])
    # RankMe of the index's features (the final k-NN's whole training split here: the same number) and of
    # the bank's embeddings, beside the accuracy (width 4: 32-d features; --proj_dim=16)
    assert last["rankme"] == result["rankme"] and 1 <= result["rankme"] <= 32
    assert 1 <= last["bank_rankme"] <= 16
    assert float(tf.make_ndarray(acc.Tensors("eval/rankme")[-1].tensor_proto)) == pytest.approx(result["rankme"])
    assert float(tf.make_ndarray(acc.Tensors("eval/bank_rankme")[-1].tensor_proto)) == pytest.approx(last["bank_rankme"])
    # Subsets: every 2nd of the 256 test and 512 training images (evenly spaced, the same every time).
    sub = tmp_path / "sub"
    out = train(f"--data_dir={fmnist_slice}", f"--model_dir={sub}", "--epochs=1", "--steps_per_epoch=1",
                "--knn_every=1", "--knn_every_queries=100", "--knn_every_index=200")
    assert out.returncode == 0, out.stderr[-3000:]
    (record,) = [json.loads(line) for line in (sub / "knn_curve.jsonl").read_text().splitlines()]
    assert (record["queries"], record["index"]) == (128, 256)


def test_a_compiled_cmsf_km_run_clusters_monitors_and_evaluates_under_xla(tmp_path, fmnist_slice):
    """--jit_compile=true end to end: the compiled step, the epoch-end k-means, the per-epoch k-NN and the
    final k-NN all run compiled; the setting is in flags.json and what the run did in result.json."""
    model_dir = tmp_path / "run"
    out = train(f"--data_dir={fmnist_slice}", f"--model_dir={model_dir}", "--method=cmsf_km", "--num_clusters=8",
                "--epochs=2", "--steps_per_epoch=3", "--knn_every=1", "--knn_every_queries=64", "--jit_compile=true")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "XLA: the train step, the epoch-end clustering" in out.stdout + out.stderr
    assert json.loads((model_dir / "flags.json").read_text())["jit_compile"] == "true"
    result = json.loads((model_dir / "result.json").read_text())
    assert result["jit_compile"] is True and result["steps"] == 6
    assert 0.0 <= result["knn_top1_k20"] <= 1.0 and len(result["knn_curve"]) == 2
    ckpt = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(model_dir / "checkpoints")))
    ids = [ckpt.get_tensor(k) for k in ckpt.get_variable_to_shape_map() if "cluster_ids" in k and "OPTIMIZER" not in k]
    assert ids and ids[0].max() == 7 and ids[0].min() == -1  # 8 clusters of the seen images, -1 for the rest


def test_the_printed_table_shows_knn_linear_probe_and_rankme_for_each_row(tmp_path, fmnist_slice):
    """What make demo ends with, on a tiny run: rows trained / untrained / raw pixels, columns 20-NN, 1-NN,
    linear (the probe on cached centre-crop features) and RankMe, the values those of result.json, and one
    line saying what each column measures."""
    model_dir = tmp_path / "run"
    out = train(f"--data_dir={fmnist_slice}", f"--model_dir={model_dir}", "--epochs=1", "--steps_per_epoch=3",
                "--knn_baselines", "--final_linear_probe")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((model_dir / "result.json").read_text())
    rows = {"trained (msf, 1 epochs)": result, "untrained": result["baselines"]["untrained"],
            "raw pixels": result["baselines"]["raw_pixels"]}
    table = out.stdout[out.stdout.index("Top-1 on the test split"):].splitlines()
    assert table[0].split() == ["Top-1", "on", "the", "test", "split", "20-NN", "1-NN", "linear", "RankMe"]
    assert len(table) == 5
    for line, (name, r) in zip(table[1:4], rows.items()):
        assert line.startswith(f"  {name} ")
        cells = line[len(name) + 2:].split()
        assert cells == [f"{100 * r['knn_top1_k20']:.1f}%", f"{100 * r['knn_top1_k1']:.1f}%",
                         f"{100 * r['linear_top1']:.1f}%", f"{r['rankme']:.1f}"], line
        assert 0.0 < r["linear_top1"] <= 1.0
    assert table[4].strip().startswith("20-NN / 1-NN:") and "linear:" in table[4] and "RankMe:" in table[4]


def test_a_flag_of_another_command_is_refused_naming_it():
    """Each command line accepts its own flags only: a foreign one stops at once with absl's line naming it
    (before any training, data loading or TensorFlow)."""
    for module, args, foreign in [
            ("cmsf_tf.train", ["--model_dir=/tmp/never", "--linear_epochs=5"], "linear_epochs"),
            ("cmsf_tf.evaluate", ["knn", "--model_dir=/tmp/never", "--bank_size=7"], "bank_size"),
            ("cmsf_tf.evaluate", ["knn", "--model_dir=/tmp/never", "--linear_epochs=3"], "linear_epochs"),
            ("cmsf_tf.export", ["--model_dir=/tmp/never", "--export_dir=/tmp/never_export", "--epochs=3"], "epochs")]:
        out = run_cli(module, *args, timeout=120)
        assert out.returncode != 0, (module, args)
        assert f"Unknown command line flag '{foreign}'" in out.stderr, out.stderr[-1000:]
        assert "Traceback" not in out.stderr
    assert not os.path.exists("/tmp/never") and not os.path.exists("/tmp/never_export")
