"""What the benchmark tools share: the machine description, alternating timing, the JSON line.

Timings are ratios measured in one run: the cases of a comparison are timed in alternating rounds, so a
slow phase of a noisy machine hits all of them, and each reports the median of its rounds.
"""

import json
import os
import platform
import statistics
import time


def machine():
    """A short description of where the numbers were measured."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": model, "cores": cores, "python": platform.python_version()}


def add_common_args(parser, quick_help):
    """The options every side-by-side benchmark takes."""
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no_torch", action="store_true")
    parser.add_argument("--json", default="", help="append the JSON line to this file")
    parser.add_argument("--quick", action="store_true", help=quick_help)


def optional_torch(no_torch):
    """The torch module, or None (with a line saying why) when it is not wanted or not installed."""
    if no_torch:
        return None
    try:
        import torch
    except ImportError:
        print("PyTorch is not installed (pip install -r requirements-bench.txt): cmsf_tf alone")
        return None
    return torch


def versions(*modules):
    out = {}
    for name in modules:
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - an optional framework may be missing or broken
            pass
    return out


def alternate(cases, rounds, repeats=1):
    """{name: [seconds per call, one per round]}: every round calls each case `repeats` times, in turn.

    `cases` maps a name to a zero-argument callable that finishes its work before returning (results
    forced to host memory). The first call of each case is a warm-up and is not timed."""
    for fn in cases.values():
        fn()
    times = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
            times[name].append((time.perf_counter() - start) / repeats)
    return times


def median_ms(seconds):
    return 1000.0 * statistics.median(seconds)


def spread_ms(seconds):
    return 1000.0 * min(seconds), 1000.0 * max(seconds)


def emit_json(tool, rows, path="", **extra):
    """Prints the one JSON line of a benchmark (and appends it to `path` when given)."""
    record = {"tool": tool, "machine": machine(), "time": time.strftime("%Y-%m-%d %H:%M:%S"), **extra, "rows": rows}
    line = json.dumps(record, sort_keys=False)
    print(line)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "a") as f:
            f.write(line + "\n")
    return record
