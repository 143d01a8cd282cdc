"""tools/reproduce_small.py --quick on a slice of the real Fashion-MNIST: every row trains a few steps
and is evaluated; the per-run JSONs, summary.md and the plot are written; a second call trains nothing."""

import inspect
import json
import os
import statistics
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "reproduce_small.py")
sys.path.insert(0, os.path.join(ROOT, "tools"))

import reproduce_small  # noqa: E402


def study(tmp_path, data_dir, *args):
    rows = [] if any(a.startswith(("--rows", "--study")) for a in args) else ["--rows=" + ",".join(reproduce_small.ROWS)]
    out = subprocess.run([sys.executable, TOOL, "--quick", f"--out={tmp_path / 'out'}", f"--runs={tmp_path / 'runs'}",
                          f"--data_dir={data_dir}", *rows, *args], cwd=ROOT, capture_output=True, text=True, timeout=1800,
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:] + (
        (tmp_path / "runs" / "quick.log").read_text()[-3000:] if (tmp_path / "runs" / "quick.log").exists() else "")
    return out.stdout


def test_quick_study_writes_every_run_the_summary_and_the_plot(tmp_path, fmnist_slice):
    study(tmp_path, fmnist_slice)
    out = tmp_path / "out"
    for row in reproduce_small.ROWS:
        record = json.loads((out / f"{row}_s0.json").read_text())
        assert record["row"] == row and record["seed"] == 0 and record["epochs"] == 2
        for key in ("knn_top1_k1", "knn_top1_k20", "linear_top1", "knn10_top1_k1"):
            assert 0.0 <= record[key] <= 1.0, (row, key)
        assert record["knn10_index_size"] == 51  # percent:10 of the 512-image slice
        assert record["train_wall_time_s"] > 0 and record["train_images_per_s"] > 0
        assert record["train_processes"] == 1 and 0 < record["train_seconds_total"] <= record["train_wall_time_s"]
        assert record["train_cpu_kernels"] in (["eigen"], ["onednn"])
        assert record["commands"]["train"].startswith("python -m cmsf_tf.train --flagfile=flags/fmnist_")
        # The per-epoch k-NN curve ends at the final k-NN when the subsets are whole.
        assert [point[0] for point in record["knn_curve"]] == [1, 2]
        # RankMe after the last epoch, and per epoch of the features and (methods with a bank) the bank
        assert 1 <= record["rankme"] <= 32 and record["rankme_curve"][-1][1] == record["rankme"]
        assert [p[0] for p in record["rankme_curve"]] == [1, 2]
        assert (record["rankme_curve"][-1][2] is None) == row.startswith("xent")
        assert ("semi10_top1" in record) == (row in reproduce_small.SEMI_ROWS)
        assert ("semi10_lr01_top1" in record) == (row in reproduce_small.SEMI_LR_ROWS)
        assert ("rank_histograms" in record) == (record["method"] in ("cmsf_2q", "cmsf_km", "cmsf_pseudo"))
        assert [e for e, _ in record["epoch_logs"]["loss"]] == [1, 2]
    noisy = json.loads((out / "xent_noise25_s0.json").read_text())
    assert "--label_noise=25" in noisy["commands"]["train"]
    summary = (out / "summary.md").read_text()
    for row in reproduce_small.ROWS:
        assert f"| {row} |" in summary
    msf = json.loads((out / "msf_s0.json").read_text())
    assert f"| {msf['rankme']:.1f} (1) |" in summary.split("## Diagnostics")[1]  # the diagnostics' RankMe column
    for _, _, _, claim in reproduce_small.ORDERINGS:
        assert claim in summary
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Resumable: a finished run is skipped; a run whose JSON is missing is collected again without training.
    result = tmp_path / "runs" / "msf_s0" / "result.json"
    before = result.stat().st_mtime_ns
    (out / "msf_s0.json").unlink()
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- study:start -->\nSTALE\n<!-- study:end -->\nafter\n")
    printed = study(tmp_path, fmnist_slice, f"--readme={readme}")
    assert "msf_s0: 20-NN" in printed and "byol_s0" not in printed
    assert result.stat().st_mtime_ns == before
    text = readme.read_text()  # the README's block is rebuilt from the JSONs, the rest kept
    assert text.startswith(f"intro\n<!-- study:start -->\nAll {len(reproduce_small.ROWS)} runs are done.") and text.endswith("<!-- study:end -->\nafter\n")
    assert "| msf | `fmnist_msf.cfg` | 2 |" in text and "STALE" not in text
    assert json.loads((out / "msf_s0.json").read_text())["knn_top1_k20"] == json.loads(result.read_text())["knn_top1_k20"]


def test_ordering_verdicts_against_the_seed_spread():
    rows = {"a": [{"m": 0.90}, {"m": 0.92}], "b": [{"m": 0.85}, {"m": 0.86}], "c": [{"m": 0.905}, {"m": 0.915}]}
    text, gap = reproduce_small.ordering_verdict("a", "b", "m", rows)
    assert text.startswith("holds") and "beyond twice the seed spread" in text and abs(gap - 5.5) < 1e-9
    text, gap = reproduce_small.ordering_verdict("c", "a", "m", rows)
    assert "not resolved" in text and abs(gap) < 1e-9
    text, _ = reproduce_small.ordering_verdict("b", "a", "m", rows)
    assert text.startswith("does not hold")
    assert reproduce_small.ordering_verdict("a", "missing", "m", rows)[0] == "not measured yet"
    # One seed of one row: inside the other row's spread the gap is not resolved; outside it, unknown.
    rows.update(one=[{"m": 0.905}], far=[{"m": 0.95}])
    text, _ = reproduce_small.ordering_verdict("one", "a", "m", rows)
    assert text.endswith("one seed of one row, the gap within the other's seed spread (1.4): not resolved")
    assert reproduce_small.ordering_verdict("far", "a", "m", rows)[0].endswith("one seed: spread unknown")
    assert reproduce_small.ordering_verdict("one", "far", "m", rows)[0].endswith("one seed: spread unknown")


def test_multi_crop_table_pairs_seeds_and_lists_only_present_pairs():
    def rec(seed, k20, linear=None):
        return {"seed": seed, "knn_top1_k20": k20, "linear_top1": linear}

    rows = {"msf": [rec(0, 0.860, 0.870), rec(1, 0.850, 0.866)],
            "msf_mc": [rec(0, 0.880, 0.875), rec(1, 0.866, None), rec(2, 0.99)],  # seed 2: no partner
            "msf_mc_time": [rec(0, 0.855)],
            "cmsf_2q_mc": [rec(0, 0.9)]}  # its row without is absent: no line
    lines = reproduce_small.multi_crop_lines(rows)
    body = [line for line in lines if line.startswith("| msf") or line.startswith("| cmsf")]
    assert [line.split(" | ")[0] for line in body] == ["| msf_mc", "| msf_mc_time"]
    mc = body[0].split(" | ")
    # per-seed differences +2.0 and +1.6: mean +1.8, sample std 0.28; linear pairs only where both have it
    assert mc[1:3] == ["msf", "equal epochs"] and mc[3] == "+1.8 ± 0.3 (2)"
    assert mc[5] == "+0.5 (1)" and mc[-1].rstrip(" |") == "–"  # semi with head lr 0.01: measured by neither
    timed = body[1].split(" | ")
    assert timed[2] == "equal wall-clock" and timed[3] == "-0.5 (1)"
    assert reproduce_small.multi_crop_lines({"msf": rows["msf"]}) == []


def test_rankme_column_only_when_the_runs_logged_it(tmp_path):
    # A committed record of the study (trained before RankMe was logged), as it is and with a RankMe.
    with open(os.path.join(ROOT, "results", "fmnist", "msf_s0.json")) as f:
        record = json.load(f)
    record.pop("rankme", None)
    reproduce_small.write_summary([record], {"rankme": 375.2}, str(tmp_path), "test")
    assert "RankMe" not in (tmp_path / "summary.md").read_text()
    reproduce_small.write_summary([dict(record, rankme=40.04), dict(record, seed=1, rankme=41.0)],
                                  {"rankme": 375.2}, str(tmp_path), "test")
    diagnostics = (tmp_path / "summary.md").read_text().split("## Diagnostics")[1]
    assert "confident fraction | RankMe |" in diagnostics and "raw pixels: 375 of 784" in diagnostics
    assert diagnostics.splitlines()[6].startswith("| msf |")
    assert diagnostics.splitlines()[6].endswith(f"| 40.5 ± {statistics.stdev([40.04, 41.0]):.1f} (2) |")


def test_rankme_of_older_runs_from_their_evaluate_knn_files(tmp_path):
    # Two committed records trained before RankMe was logged; one has an `evaluate knn` file beside it.
    for name in ("msf_s0", "msf_s1"):
        with open(os.path.join(ROOT, "results", "fmnist", f"{name}.json")) as f:
            record = json.load(f)
        record.pop("rankme", None)
        (tmp_path / f"{name}.json").write_text(json.dumps(record))
    (tmp_path / "floors.json").write_text(json.dumps({"knn_top1_k20": 0.841}))
    (tmp_path / "rankme").mkdir()
    (tmp_path / "rankme" / "msf_s0.json").write_text(json.dumps({"protocol": "knn", "rankme": 41.61}))
    records = reproduce_small.load_records(str(tmp_path))
    assert [(r["seed"], r.get("rankme")) for r in records] == [(0, 41.61), (1, None)]
    assert "rankme" not in json.loads((tmp_path / "msf_s0.json").read_text())  # the record file stays as made
    reproduce_small.write_summary(records, None, str(tmp_path), "test")
    diagnostics = (tmp_path / "summary.md").read_text().split("## Diagnostics")[1]
    assert "`rankme/<run>.json`" in diagnostics
    assert [l for l in diagnostics.splitlines() if l.startswith("| msf |")][0].endswith("| 41.6 (1) |")


def test_train_flag_follows_flag_files_and_overrides():
    with open(os.path.join(ROOT, "results", "fmnist", "cmsf_pseudo_s0.json")) as f:
        pseudo = json.load(f)["commands"]["train"]
    assert reproduce_small.train_flag(pseudo, "topk") == "10"  # fmnist_pseudo.cfg over fmnist_base.cfg's 5
    two_q = "python -m cmsf_tf.train --flagfile=flags/fmnist_cmsf_2q.cfg --seed=1"
    assert reproduce_small.train_flag(two_q, "topk") == "5"  # from the included fmnist_base.cfg
    assert reproduce_small.train_flag(two_q + " --topk=7", "topk") == "7"  # the command line comes last
    assert reproduce_small.train_flag(two_q, "no_such_flag") is None


def test_rank_table_of_the_constrained_neighbours(tmp_path):
    from cmsf_tf.methods import base

    assert reproduce_small.RANK_BINS == inspect.signature(base.RankHistogram.__init__).parameters["bins"].default
    counts = [3, 1, 0, 0, 0, 2, 0, 4]  # ranks 0..7, k = 5: 4 of 10 within, median rank 5
    assert reproduce_small.rank_summary(counts, 5) == (0.4, 5, 0.0)
    full = np.zeros(reproduce_small.RANK_BINS)
    full[[0, -1]] = [1, 3]  # a full-length histogram: the last bin is the tail
    assert reproduce_small.rank_summary(full, 5) == (0.25, reproduce_small.RANK_BINS - 1, 0.75)
    records = []
    for seed in range(3):
        with open(os.path.join(ROOT, "results", "fmnist", f"cmsf_2q_s{seed}.json")) as f:
            records.append(json.load(f))
    with open(os.path.join(ROOT, "results", "fmnist", "msf_s0.json")) as f:
        msf = json.load(f)  # no constraint: no histograms
    reproduce_small.write_summary(records + [msf], None, str(tmp_path), "test")
    table = (tmp_path / "summary.md").read_text().split("## Where the constrained neighbours come from")[1]
    rows = [line for line in table.splitlines() if line.startswith("| cmsf_2q |")]
    assert [row.split(" | ")[1] for row in rows] == ["2", "11", "20"]  # second, middle and last epochs
    for row, epoch in zip(rows, ("2", "11", "20")):
        shares, medians = [], []
        for r in records:  # the NumPy reference of each seed's share within the top-5 and median rank
            c = np.asarray(r["rank_histograms"][epoch], float) / np.sum(r["rank_histograms"][epoch])
            shares.append(c[:5].sum())
            medians.append(int(np.argmax(np.cumsum(c) >= 0.5)))
        assert row.split(" | ")[2] == f"{100 * np.mean(shares):.1f} ± {100 * np.std(shares, ddof=1):.1f} (3)"
        assert row.split(" | ")[3].startswith(f"{statistics.median(medians):,.0f} ({min(medians):,}–{max(medians):,})")
    assert "| msf |" not in table.split("![")[0]  # rows without histograms have no lines


def test_a_stopped_worker_exits_with_one_line_and_the_signal_code(monkeypatch, capsys):
    """A study run stopped by SIGTERM (its checkpoint saved) ends its worker with train's exit code and one
    line, not a traceback; the study then says "stopped", and running it again resumes."""
    import pytest

    from cmsf_tf.train import Interrupted

    def stopped(specs):
        raise Interrupted("SIGTERM")

    monkeypatch.setattr(reproduce_small, "worker", stopped)
    monkeypatch.setattr(sys, "argv", ["reproduce_small.py", "--worker", "[]"])
    with pytest.raises(SystemExit) as exit_info:
        reproduce_small.main()
    assert exit_info.value.code == 143
    err = capsys.readouterr().err
    assert err.strip() == "stopped by SIGTERM; the checkpoint is saved: run the study again to resume"


def test_training_minutes_count_every_step_of_a_resumed_run_at_its_speed():
    command = "python -m cmsf_tf.train --flagfile=flags/fmnist_msf.cfg --seed=0"  # batch 256 from fmnist_base.cfg
    record = {"steps": 4680, "train_images_per_s": 128.0, "train_wall_time_s": 600.0,  # the last stretch only
              "commands": {"train": command}}
    assert reproduce_small.training_minutes(record) == 4680 * 256 / 128.0 / 60
    assert reproduce_small.training_minutes(dict(record, train_images_per_s=None)) is None
    assert reproduce_small.training_minutes(dict(record, commands={})) is None
    # A record that kept every process's seconds is read as it is, not estimated.
    assert reproduce_small.training_minutes(dict(record, train_seconds_total=3000.0, train_processes=3)) == 50.0


def test_the_summary_names_the_machines_its_runs_trained_on():
    records = [{"machine": "CPU A, 2 cores"}, {"machine": "CPU A, 2 cores"}, {"machine": "CPU B, 2 cores"}, {}]
    line = reproduce_small.machines_line(records, "CPU B, 2 cores")
    assert line == ("Summary made on: CPU B, 2 cores. Runs trained on: CPU A, 2 cores (2 runs); "
                    "CPU B, 2 cores (1 run); not recorded (1 run).")
    assert reproduce_small.machines_line([], "CPU B, 2 cores").endswith("Runs trained on: none yet.")
    # With the CPU kernel sets the runs ran: one per run, "mixed" for a run resumed under the other set.
    records = [{"machine": "CPU A, 2 cores", "train_cpu_kernels": ["onednn"]},
               {"machine": "CPU A, 2 cores", "train_cpu_kernels": ["eigen", "onednn"]},
               {"machine": "CPU A, 2 cores", "train_cpu_kernels": ["eigen"]}, {"machine": "CPU A, 2 cores"},
               {"machine": "CPU A, 2 cores", "train_cpu_kernels": ["onednn"]}]
    line = reproduce_small.machines_line(records, "CPU A, 2 cores")
    assert line.endswith("Runs trained on: CPU A, 2 cores (5 runs). CPU kernels: Eigen (1 run); mixed (1 run); "
                         "not recorded (1 run); oneDNN (2 runs).")
    assert reproduce_small.machine_name().endswith(" cores")


def test_every_row_belongs_to_a_study_and_each_study_lists_only_its_own_orderings():
    studies = reproduce_small.STUDIES
    assert {row for s in studies.values() for row in s["rows"]} == set(reproduce_small.ROWS)
    for name, s in studies.items():
        assert set(s["rows"]) <= set(reproduce_small.ROWS), name
    assert len({os.path.normpath(s["out"]) for s in studies.values()}) == len(studies)  # no shared results
    measured = {"msf": [{"knn_top1_k20": 0.86}], "cmsf_km": [{"knn_top1_k20": 0.857}], "msf_mc": [{"knn_top1_k20": 0.878}]}
    claims = "\n".join(reproduce_small.ordering_lines(measured, studies["multi_crop"]["rows"]))
    assert "multi-crop lifts MSF, equal epochs (not a claim of the paper)** (`knn_top1_k20`): holds" in claims
    assert "multi-crop lifts CMSF-2Q, equal wall-clock" in claims and "CMSF-KM > MSF on k-NN (self-supervised)" in claims
    assert "CMSF-2Q > MSF on k-NN, both with multi-crop** (`knn_top1_k20`): not measured yet" in claims
    assert "CMSF-2Q > MSF on k-NN, both with multi-crop, equal wall-clock** (`knn_top1_k20`): not measured" in claims
    assert "BYOL" not in claims and "Pseudo" not in claims and "fill" not in claims and "cross-entropy" not in claims
    main = "\n".join(reproduce_small.ordering_lines({"msf": measured["msf"]}, studies["main"]["rows"]))
    assert "MSF > BYOL" in main and "CMSF-Pseudo" in main and "multi-crop" not in main and "fill" not in main
    # Without the study's rows: every ordering with a measured row, as before.
    assert "MSF > BYOL" in "\n".join(reproduce_small.ordering_lines(measured))


def test_a_side_study_summary_is_rebuilt_from_its_own_directory(tmp_path, monkeypatch):
    """--summary_only --study=multi_crop --out=DIR on copies of the committed records: the side study's
    title and command, its orderings only, the with-minus-without table; no training."""
    import shutil

    source = os.path.join(ROOT, "results", "fmnist", "multi_crop")
    for name in os.listdir(source):
        if name.endswith(".json"):
            shutil.copy(os.path.join(source, name), tmp_path / name)
    monkeypatch.setattr(sys, "argv", ["reproduce_small.py", "--study=multi_crop", "--summary_only",
                                      f"--out={tmp_path}", f"--runs={tmp_path / 'runs'}"])
    reproduce_small.main()
    summary = (tmp_path / "summary.md").read_text()
    assert summary.startswith("# Fashion-MNIST study: multi-crop, with and without, at equal epochs and at equal "
                              "wall-clock\n\nMade by `python tools/reproduce_small.py --study=multi_crop`")
    assert "## Multi-crop: with minus without" in summary and "| msf_mc | msf | equal epochs |" in summary
    assert "BYOL" not in summary and "CMSF-Pseudo" not in summary
    assert not (tmp_path / "runs").exists() or not os.listdir(tmp_path / "runs")


def test_a_study_stopped_halfway_leaves_a_summary_of_the_whole_study_up_to_date(tmp_path, monkeypatch):
    """The summary is rebuilt after every run (a study stopped after its first run has it in summary.md),
    and describes the whole study whichever --rows the call trains: the orderings of rows still to come stay
    listed. Training and collecting are stood in for (the committed msf_s0 record plays every run)."""
    import shutil

    source = os.path.join(ROOT, "results", "fmnist", "multi_crop")
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(os.path.join(source, "floors.json"), out / "floors.json")
    with open(os.path.join(source, "msf_s0.json")) as f:
        committed = json.load(f)
    trained, summary_while_second_trains = [], []

    def fake_call(command, **kwargs):
        spec = json.loads(command[command.index("--worker") + 1])[0]
        trained.append(spec["model_dir"])
        if len(trained) > 1:  # the second run: what its study's summary says while it trains; then SIGTERM
            summary = out / "summary.md"
            summary_while_second_trains.append(summary.read_text() if summary.exists() else "")
            return 143
        os.makedirs(spec["model_dir"])
        with open(reproduce_small.RunDir(spec["model_dir"]).result_path, "w") as f:
            f.write("{}")
        return 0

    monkeypatch.setattr(reproduce_small.subprocess, "call", fake_call)
    monkeypatch.setattr(reproduce_small, "collect",
                        lambda row, seed, model_dir, commands: dict(committed, row=row, seed=seed))
    monkeypatch.setattr(sys, "argv", ["reproduce_small.py", "--study=multi_crop", "--rows=msf,msf_mc", "--seeds=1",
                                      f"--out={out}", f"--runs={tmp_path / 'runs'}"])
    with pytest.raises(SystemExit, match="1 runs failed: msf_mc_s0"):
        reproduce_small.main()
    assert len(trained) == 2
    (during,) = summary_while_second_trains
    assert "| msf |" in during and "| msf_mc |" not in during  # the first run, in before the second starts
    summary = (out / "summary.md").read_text()
    assert "| msf |" in summary and "| msf_mc |" not in summary
    assert "CMSF-KM > MSF on k-NN, both with multi-crop" in summary  # a row of the study, not of this call
