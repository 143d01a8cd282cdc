"""Renders the newest run of each benchmark in bench/results.json (JSON lines written by the bench_*.py
tools with --json) as Markdown, and puts it into bench/README.md between the `bench:start` / `bench:end`
markers (`--readme`), with the machine it ran on.

    python tools/bench_report.py [--results=bench/results.json] [--readme=bench/README.md]
"""

import argparse
import json
import re


def latest(*paths):
    """{tool: newest record}; bench_step records of different --nets are merged (newest per net)."""
    runs, step_by_net = {}, {}
    for path in paths:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                record = json.loads(line)
                runs[record["tool"]] = record
                if record["tool"] == "bench_step":
                    for row in record["rows"]:
                        step_by_net.setdefault(row["net"], {}).setdefault(record["time"], []).append(row)
    if step_by_net:
        rows = []
        for by_time in step_by_net.values():
            rows += by_time[max(by_time)]
        runs["bench_step"] = dict(runs["bench_step"], rows=rows)
    return runs


def table(rows, columns):
    """A Markdown table of `rows` with `columns` (title, key[, "optional"]): an optional column only where
    a row has a value in it (bench_input's small-crop ratio, present when it ran with --multi_crop)."""
    columns = [c for c in columns if len(c) < 3 or any(row.get(c[1]) is not None for row in rows)]
    head = "| " + " | ".join(c[0] for c in columns) + " |"
    rule = "|" + "---|" * len(columns)
    body = ["| " + " | ".join(_fmt(row.get(c[1])) for c in columns) + " |" for row in rows]
    return "\n".join([head, rule, *body])


def _fmt(value):
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.3f}" if value < 10 else f"{value:,.1f}"
    return str(value)


# tool -> (heading of its newest record and settings, table columns), in the page's order after the step.
SECTIONS = (
    ("bench_nn",
     lambda r, s: (f"Neighbour step (`tools/bench_nn.py`, {r['time']}: B {s['batch']}, bank {s['bank']:,} x "
                   f"{s['dim']}, k {s['k']}, k' {s['kprime']}, {s['classes']:,} classes, {s['clusters']:,} "
                   f"clusters{', with the gradient to the queries' if s.get('grad', True) else ', forward only'}):"),
     [("constraint", "constraint"), ("dtype", "dtype"), ("cmsf_tf ms", "cmsf_tf_ms"),
      ("authors' formulation ms", "authors_ms"), ("ratio", "ratio")]),
    ("bench_input",
     lambda r, s: (f"Input pipeline (`tools/bench_input.py`, {r['time']}: two-view {s['image_size']} px training "
                   f"images per second on one core, {s['images']} JPEGs of ~500x375, median of "
                   f"{s.get('rounds', 1)} alternating rounds; the train step's conversion of uint8 views to "
                   f"normalised float costs {s.get('step_normalise_ms_per_image', 0):.2f} ms per two-view image "
                   "on one core of this CPU, nothing on an accelerator):"),
     [("pipeline", "pipeline"), ("output", "output"), ("images/s", "images_per_s"), ("min", "min"), ("max", "max"),
      ("vs the authors'", "vs_reference"), ("vs torchvision uint8", "vs_reference_uint8"),
      ("vs without small crops", "vs_single_crop", "optional")]),
    ("bench_knn",
     lambda r, s: (f"k-NN retrieval (`tools/bench_knn.py`, {r['time']}: {s['n']:,} x {s['dim']} index, "
                   f"{s['queries']:,} queries, {s['classes']:,} classes, 20-NN majority vote):"),
     [("search", "search"), ("search s", "search_s"), ("speed-up", "speedup"), ("labels agree", "label_agreement"),
      ("top-1", "top1")]),
    ("bench_kmeans",
     lambda r, s: (f"k-means (`tools/bench_kmeans.py`, {r['time']}: {s['n']:,} x {s['d']} unit vectors around "
                   f"{s['k']:,} centres -> {s['k']:,} clusters, {s['iters']} iterations; inertia = squared "
                   "distances to each method's own cluster means):"),
     [("method", "method"), ("seconds", "seconds"), ("inertia", "inertia"), ("time vs faiss", "time_vs_faiss"),
      ("inertia vs faiss", "inertia_vs_faiss"), ("meets target", "meets_target")]),
)


def render(runs):
    out = []
    step = runs.get("bench_step")
    if step:
        m = step["machine"]
        out.append(f"Train step (`tools/bench_step.py`, {step['time']}, {m['cpu']}, {m['cores']} cores, "
                   f"{', '.join(f'{k} {v}' for k, v in step.get('versions', {}).items())}):\n")
        out.append(table(step["rows"], [("net", "net"), ("method", "method"), ("framework", "framework"),
                                        ("ms/step", "ms"), ("min", "min_ms"), ("max", "max_ms"),
                                        ("images/s", "images_per_s"), ("vs byol", "vs_byol"),
                                        ("vs PyTorch", "vs_torch"), ("peak RSS MB", "rss_mb")]))
    for tool, heading, columns in SECTIONS:
        record = runs.get(tool)
        if record:
            out.append("\n" + heading(record, record["settings"]) + "\n")
            out.append(table(record["rows"], columns))
    return "\n".join(out) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="bench/results.json", help="comma-separated JSON-lines files")
    parser.add_argument("--readme", default="")
    args = parser.parse_args()
    text = render(latest(*args.results.split(",")))
    print(text)
    if args.readme:
        with open(args.readme) as f:
            readme = f.read()
        pattern = re.compile(r"(<!-- bench:start -->\n).*?(<!-- bench:end -->)", re.S)
        if not pattern.search(readme):
            raise SystemExit(f"{args.readme} has no <!-- bench:start --> ... <!-- bench:end --> block")
        with open(args.readme, "w") as f:
            f.write(pattern.sub(lambda m: m.group(1) + text + m.group(2), readme))


if __name__ == "__main__":
    main()
