"""Smoke tests of the benchmark tools at tiny sizes: they run, every case gives a finite time, and the
report renders. No timing is asserted (benchmarks report ratios; tests never time)."""

import json
import math
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")


def run_tool(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_bench_nn_quick(tmp_path):
    results = tmp_path / "results.json"
    run_tool(os.path.join(TOOLS, "bench_nn.py"), "--quick", "--no_torch", f"--json={results}")
    record = json.loads(results.read_text().splitlines()[-1])
    assert record["tool"] == "bench_nn"
    assert {(r["constraint"], r["dtype"]) for r in record["rows"]} == {
        (c, d) for c in ("msf", "2q", "label", "km") for d in ("float32", "bfloat16")}
    assert all(math.isfinite(r["cmsf_tf_ms"]) and r["cmsf_tf_ms"] > 0 for r in record["rows"])


def test_bench_step_quick_and_report(tmp_path):
    results = tmp_path / "results.json"
    run_tool(os.path.join(TOOLS, "bench_step.py"), "--quick", "--no_torch", "--methods=byol,cmsf_km",
             f"--json={results}")
    record = json.loads(results.read_text().splitlines()[-1])
    rows = {r["method"]: r for r in record["rows"]}
    assert set(rows) == {"byol", "cmsf_km"}
    assert all("error" not in r and r["ms"] > 0 and r["rss_mb"] > 0 for r in rows.values())
    assert rows["byol"]["vs_byol"] == 1.0 and rows["cmsf_km"]["vs_byol"] > 0
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench:start -->\nold\n<!-- bench:end -->\nrest\n")
    run_tool(os.path.join(TOOLS, "bench_report.py"), f"--results={results}", f"--readme={readme}")
    text = readme.read_text()
    assert "old" not in text and "| tiny | cmsf_km | cmsf_tf |" in text and text.endswith("rest\n")
    # Every method's process alive at once, taking turns: the same rows.
    run_tool(os.path.join(TOOLS, "bench_step.py"), "--quick", "--no_torch", "--methods=byol,cmsf_2q",
             "--alternate_methods", f"--json={results}")
    rows = {r["method"]: r for r in json.loads(results.read_text().splitlines()[-1])["rows"]}
    assert set(rows) == {"byol", "cmsf_2q"} and rows["cmsf_2q"]["vs_byol"] > 0


def test_bench_step_reports_every_fresh_process(tmp_path):
    results = tmp_path / "results.json"
    out = run_tool(os.path.join(TOOLS, "bench_step.py"), "--quick", "--no_torch", "--methods=msf", "--processes=2",
                   f"--json={results}")
    (row,) = json.loads(results.read_text().splitlines()[-1])["rows"]
    assert row["framework"] == "cmsf_tf" and len(row["processes"]) == 2 and len(row["foreign"]) == 2
    assert row["min_ms"] == min(row["processes"]) and row["max_ms"] == max(row["processes"])
    assert all(v is None or 0 <= v <= 1.5 for v in row["foreign"])
    assert out.count("process ") >= 2  # a line per process, as it finishes


def test_process_spread_and_foreign_share():
    sys.path.insert(0, TOOLS)
    import bench_step

    spread = bench_step.process_spread([100.0, 110.0, 120.0, 300.0])
    assert spread == {"ms": 115.0, "min_ms": 100.0, "max_ms": 300.0, "slowest_vs_fastest": 3.0,
                      "within_15pct_of_fastest": 2}  # 100 and 110 (<= 115)
    # 2 cores for 10 s: the machine busy 14 CPU-seconds, 8 of them the process's own -> 6 / 20 foreign.
    assert bench_step.foreign_share(100.0, 114.0, 8.0, 10.0, 2) == 0.3
    assert bench_step.foreign_share(100.0, 107.0, 8.0, 10.0, 2) == 0.0  # clock-tick round-off, never negative
    assert bench_step.foreign_share(None, 107.0, 8.0, 10.0, 2) is None
    assert bench_step.machine_busy_seconds() is None or bench_step.machine_busy_seconds() > 0


def test_busy_cores_take_a_core_while_the_block_runs():
    """--busy_cores: the load the tool puts beside the timed processes is real CPU work, and it stops."""
    import time

    sys.path.insert(0, TOOLS)
    import bench_step

    if bench_step.machine_busy_seconds() is None:
        return  # no /proc/stat: the arithmetic above is all this machine can check
    with bench_step.BusyCores(1) as busy:
        time.sleep(1.0)  # the spawned interpreter starting
        before, start = bench_step.machine_busy_seconds(), time.perf_counter()
        time.sleep(2.0)
        used = bench_step.machine_busy_seconds() - before
        wall = time.perf_counter() - start
    assert used >= 0.6 * wall, (used, wall)  # about one core's worth while this process slept
    assert not any(p.is_alive() for p in busy.procs)
    out = subprocess.run([sys.executable, os.path.join(TOOLS, "bench_step.py"), "--busy_cores=1"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--busy_cores needs --processes" in out.stderr


def compared_rows(tmp_path, method, flag, variant, ratio):
    """bench_step --quick timing cmsf_tf's step and `variant`'s (the step that `flag` adds) for `method`: both
    rows timed, and the variant's row holding `ratio`, its ratio to the cmsf_tf step. Returns the rows."""
    results = tmp_path / "results.json"
    printed = run_tool(os.path.join(TOOLS, "bench_step.py"), "--quick", "--no_torch", f"--methods={method}", flag,
                       f"--json={results}")
    rows = {r["framework"]: r for r in json.loads(results.read_text().splitlines()[-1])["rows"]}
    assert set(rows) == {"cmsf_tf", variant}
    # The printed table keeps its columns for the variant's longer name: ms/step ends where the header's does.
    header = next(line for line in printed.splitlines() if line.startswith("method "))
    for fw in rows:
        line = next(line for line in printed.splitlines() if line.startswith(f"{method:12s} {fw} "))
        ms = list(re.finditer(r"\S+", line))[2]  # method, framework, ms/step
        assert ms.end() == header.index("ms/step") + len("ms/step"), (header, line)
    assert all("error" not in r and r["ms"] > 0 for r in rows.values())
    # (the ratio of the unrounded times; the rows hold them rounded to 0.01 ms)
    assert abs(rows[variant][ratio] - rows[variant]["ms"] / rows["cmsf_tf"]["ms"]) < 2e-3
    return rows


def test_bench_step_compares_the_xla_compiled_step(tmp_path):
    compared_rows(tmp_path, "cmsf_pseudo", "--compare_xla", "cmsf_tf_xla", "vs_no_xla")


def test_bench_step_compares_the_multi_crop_step(tmp_path):
    compared_rows(tmp_path, "cmsf_km", "--compare_multi_crop=2:14:96", "cmsf_tf_multi_crop", "vs_single_crop")


def test_bench_step_compares_the_step_without_onednn(tmp_path):
    rows = compared_rows(tmp_path, "msf", "--compare_onednn", "cmsf_tf_no_onednn", "vs_onednn")
    assert rows["cmsf_tf"]["onednn"] is True and rows["cmsf_tf_no_onednn"]["onednn"] is False  # as each process ran


def test_bench_kmeans_quick_and_report(tmp_path):
    results = tmp_path / "results.json"
    out = run_tool(os.path.join(TOOLS, "bench_kmeans.py"), "--n=3000", "--d=16", "--k=30", "--iters=3",
                   f"--json={results}")
    record = json.loads(results.read_text().splitlines()[-1])
    assert record["tool"] == "bench_kmeans" and json.loads(out.strip().splitlines()[-1]) == record
    ours = [r for r in record["rows"] if r["method"].startswith("cmsf_tf")]
    assert [r["method"] for r in ours] == ["cmsf_tf random + split (default)", "cmsf_tf random + farthest",
                                           "cmsf_tf kmeans++ + split", "cmsf_tf random + split (XLA)"]
    assert all(r["seconds"] > 0 and r["inertia"] > 0 and r["gflop_per_s"] > 0 for r in ours)
    readme = tmp_path / "README.md"
    readme.write_text("<!-- bench:start -->\n<!-- bench:end -->\n")
    run_tool(os.path.join(TOOLS, "bench_report.py"), f"--results={results}", f"--readme={readme}")
    assert "| cmsf_tf random + split (default) |" in readme.read_text()


def test_bench_input_and_knn_quick_and_report(tmp_path):
    results = tmp_path / "results.json"
    printed = run_tool(os.path.join(TOOLS, "bench_input.py"), "--images=64", "--seconds=0.5", "--rounds=1",
                       "--multi_crop=2:32", f"--json={results}")
    run_tool(os.path.join(TOOLS, "bench_knn.py"), "--n=20000", "--queries=50", "--classes=10", "--dim=16",
             f"--json={results}")
    records = {json.loads(line)["tool"]: json.loads(line) for line in results.read_text().splitlines()}
    input_rows = records["bench_input"]["rows"]
    assert [r["output"] for r in input_rows] == ["uint8", "float32", "float32", "uint8", "uint8"]
    assert all(r["images_per_s"] > 0 for r in input_rows)
    # --multi_crop: our pipeline with the small crops, its images/s against ours without (medians, unrounded)
    small = input_rows[-1]
    assert small["pipeline"] == "cmsf_tf, uint8 views + 2 small crops of 32 px"
    assert abs(small["vs_single_crop"] - small["images_per_s"] / input_rows[0]["images_per_s"]) < 2e-3
    assert f"with 2 small crops of 32 px: {small['vs_single_crop']:.2f}x the images/s without them" in printed
    assert input_rows[0]["vs_reference"] > 0 and input_rows[0]["vs_reference_uint8"] > 0
    assert records["bench_input"]["settings"]["step_normalise_ms_per_image"] > 0
    knn_rows = records["bench_knn"]["rows"]
    assert knn_rows[0]["search"] == "exact (brute force)" and knn_rows[1]["search"].endswith("(defaults)")
    assert 0 <= knn_rows[1]["label_agreement"] <= 1
    readme = tmp_path / "README.md"
    readme.write_text("<!-- bench:start -->\n<!-- bench:end -->\n")
    run_tool(os.path.join(TOOLS, "bench_report.py"), f"--results={results}", f"--readme={readme}")
    text = readme.read_text()
    assert "Input pipeline (`tools/bench_input.py`" in text and "| exact (brute force) |" in text
    assert "| vs without small crops |" in text
    # The optional column is left out of a table none of whose rows has it (runs without --multi_crop).
    sys.path.insert(0, TOOLS)
    import bench_report

    assert bench_report.table([{"a": 1}], [("A", "a"), ("B", "b", "optional")]) == "| A |\n|---|\n| 1 |"
    assert bench_report.table([{"a": 1}], [("A", "a"), ("B", "b")]) == "| A | B |\n|---|---|\n| 1 | — |"


def test_bench_input_refuses_a_bad_small_crop_spec():
    out = subprocess.run([sys.executable, os.path.join(TOOLS, "bench_input.py"), "--multi_crop=6"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == ["error: --multi_crop '6' is not N:SIZE[:MIN_SCALE:MAX_SCALE] (e.g. 6:96 "
                                               "or 6:96:0.05:0.14)"]


def test_profile_step_quick(tmp_path):
    results = tmp_path / "results.json"
    out = run_tool(os.path.join(TOOLS, "profile_step.py"), "--net=tiny", "--method=cmsf_2q", "--steps=2",
                   f"--json={results}")
    record = json.loads(results.read_text().splitlines()[-1])
    parts = {r["part"]: r for r in record["rows"]}
    assert record["tool"] == "profile_step" and "by op type" in out
    assert parts["online network + gradient"]["ms_per_step"] > 0 and parts["target network"]["ms_per_step"] > 0
    assert abs(sum(r["share"] for r in record["rows"]) - 1) < 0.01
    assert any(op["op"].endswith("Conv2D") for op in record["op_types"])


def test_bench_serving_quick_and_its_page(tmp_path):
    results, page = tmp_path / "serving.json", tmp_path / "serving.md"
    run_tool(os.path.join(TOOLS, "bench_serving.py"), "--sizes=100,300", "--batches=1,4", "--calls=3", "--width=4",
             f"--json={results}", f"--doc={page}")
    record = json.loads(results.read_text().splitlines()[-1])
    assert record["tool"] == "bench_serving" and record["feature_dim"] == 32
    assert record["served_by"].startswith("a process with TensorFlow only")  # it stops otherwise
    assert {(r["index"], r["signature"], r["batch"]) for r in record["rows"]} == {
        (n, s, b) for n in (100, 300) for s in ("serve", "classify", "neighbours") for b in (1, 4)}
    assert all(0 < r["p50_ms"] <= r["p99_ms"] and r["calls"] == 3 for r in record["rows"])
    summary = record["summary"]
    assert summary["size_ratio"] == 3.0 and set(summary["search_ms_b4"]) == {"100", "300"}
    assert summary["classify_over_serve_b4_100"] > 0
    text = page.read_text()
    assert "| 300 | classify | 4 |" in text and "classify / serve at batch 4, 100 rows" in text
