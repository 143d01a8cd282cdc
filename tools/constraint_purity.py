"""Does the constraint pick purer neighbours? Replays a CMSF-2Q or CMSF-KM run's constraint on the bank its
last checkpoint holds, for the run's own setting and a sweep of the variable the paper says matters
(k' for 2Q, the number of clusters for KM), and reports the neighbours' purity (the share with the query's
true label) against the plain top-k's.

    python tools/constraint_purity.py --model_dir=runs/fmnist/cmsf_2q_s0 [--k_primes=5,10,20,50,100,200,500]
    python tools/constraint_purity.py --model_dir=runs/fmnist/cmsf_km_s0 [--clusters=50,200,600,2400,6000]
        [--out=results/fmnist/constraints/cmsf_km_s0.json]

The queries are the bank's rows themselves, as in the train step, where a batch's targets are written to
the bank before the search (so each query finds itself: purity counts it, as the `purity` metric does).
2Q: each row's previous view is the parallel row of the second bank M'; KM: each row's cluster is that of
its image, from the checkpoint's cluster ids (the run's setting) or from re-clustering the checkpoint's
per-image pool of latest targets with the run's k-means settings (the sweep). The neighbour selection is
the library's own: the two steps of `ops.two_queue_neighbours` (`nearest_neighbours`, then
`nearest_among_from_sims`, called apart to keep the candidates) and `ops.label_neighbours` with the run's
fill rule.
"""

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def purity(indices, labels):
    """Share of the neighbours (int [Q, k] rows into `labels`) whose label is their query's (row i's)."""
    import numpy as np

    return float(np.mean(labels[indices] == labels[:, None]))


def two_queue_rows(sims, previous, k, k_prime):
    """(2Q-constrained neighbours [Q, k], their candidates [Q, k']) of the bank rows: the candidates are
    the k' rows of M' nearest each row's previous view; the neighbours the k of those nearest in M."""
    from cmsf_tf import ops

    candidates = ops.nearest_neighbours(previous, previous, k_prime).numpy()
    return ops.nearest_among_from_sims(sims, candidates, k).numpy(), candidates


def cluster_rows(sims, row_clusters, k, fill):
    """KM-constrained neighbours [Q, k] of the bank rows: the top-k among the rows of the same cluster."""
    from cmsf_tf import ops

    return ops.label_neighbours(sims, row_clusters, row_clusters, k, fill).numpy()


def load_state(model_dir):
    """(flags, step, {name: array}) of a run's newest checkpoint: the bank, second bank, pool, cluster ids."""
    import tensorflow as tf

    from cmsf_tf.errors import UserError
    from cmsf_tf.eval import encoder

    try:
        flags, path = encoder.run_flags(model_dir), encoder.latest_checkpoint(model_dir)
    except UserError as e:  # not a run, no checkpoint, a damaged flags.json
        raise SystemExit(f"error: {e}") from None
    reader = tf.train.load_checkpoint(path)
    names = reader.get_variable_to_shape_map()
    state = {}
    for key in ("bank/embeddings", "bank/true_labels", "bank/image_indices", "previous_bank/embeddings",
                "pool/embeddings", "pool/writes", "cluster_ids"):
        name = f"model/{key}/.ATTRIBUTES/VARIABLE_VALUE"
        if name in names:
            state[key] = reader.get_tensor(name)
    return flags, encoder.checkpoint_step(path), state


def analyse(flags, state, k_primes=(), clusters=(), seed=0):
    """The report (a dict) for a 2Q or KM run's state; SystemExit for other methods or a bank never filled."""
    import numpy as np
    import tensorflow as tf

    from cmsf_tf import clustering

    tf.get_logger().setLevel("ERROR")  # each cluster count traces k-means anew, which TF warns about
    method, k = flags["method"], int(flags["topk"])
    if method not in ("cmsf_2q", "cmsf_km"):
        raise SystemExit(f"error: {method} has no constraint to replay (a cmsf_2q or cmsf_km run is needed)")
    filled = state["bank/image_indices"] >= 0
    if not filled.all():
        raise SystemExit(f"error: the bank holds only {int(filled.sum())} of {filled.size} rows (train longer)")
    bank = tf.constant(state["bank/embeddings"], tf.float32)
    labels = state["bank/true_labels"]
    sims = tf.matmul(bank, bank, transpose_b=True)
    report = {"method": method, "topk": k, "bank_rows": int(bank.shape[0]),
              "plain_purity": purity(tf.math.top_k(sims, k).indices.numpy(), labels), "rows": []}
    if method == "cmsf_2q":
        previous = tf.constant(state["previous_bank/embeddings"], tf.float32)
        own = int(flags["topk_prime"])
        for k_prime in sorted({own, *k_primes}):
            chosen, candidates = two_queue_rows(sims, previous, k, min(k_prime, int(bank.shape[0])))
            report["rows"].append({"k_prime": k_prime, "purity": purity(chosen, labels),
                                   "candidate_purity": purity(candidates, labels), "run_setting": k_prime == own})
        return report
    fill = flags.get("constraint_fill", "nearest")
    images = state["bank/image_indices"].astype(np.int64)

    def row(num_clusters, ids, run_setting):
        row_clusters = ids[images]
        if (row_clusters < 0).any():
            raise SystemExit("error: the checkpoint's bank holds images not clustered yet (the run stopped "
                             "before its first epoch-end k-means)")
        chosen = cluster_rows(sims, row_clusters, k, fill)
        same = np.bincount(row_clusters)[row_clusters]  # bank rows sharing each row's cluster
        return {"clusters": num_clusters, "purity": purity(chosen, labels), "run_setting": run_setting,
                "bank_rows_per_cluster": float(same.mean()), "short_sets": float(np.mean(same < k))}

    report["rows"].append(row(int(flags["num_clusters"]), state["cluster_ids"].astype(np.int64), True))
    seen = np.flatnonzero(state["pool/writes"] > 0)
    pool = state["pool/embeddings"][seen]
    for num_clusters in clusters:
        _, assignments, _ = clustering.spherical_kmeans(
            tf.constant(pool), num_clusters, iters=int(flags.get("kmeans_iters", 20)), seed=seed,
            init=flags.get("kmeans_init", "random"))
        ids = np.full(len(state["pool/writes"]), -1, np.int64)
        ids[seen] = assignments.numpy()
        report["rows"].append(row(num_clusters, ids, False))
    return report


def markdown(report):
    key = "k_prime" if report["method"] == "cmsf_2q" else "clusters"
    lines = [f"{report['method']} (k {report['topk']}, {report['bank_rows']:,} bank rows): plain top-"
             f"{report['topk']} purity {100 * report['plain_purity']:.1f}%", "",
             f"| {'k′' if key == 'k_prime' else key} | constrained purity | vs plain | "
             + ("candidate purity |" if key == "k_prime" else "bank rows per cluster | short sets |"),
             "|---|---|---|---|" + ("" if key == "k_prime" else "---|")]
    for r in report["rows"]:
        label = f"{r[key]:,}" + (" (the run's)" if r["run_setting"] else "")
        gap = f"{100 * (r['purity'] - report['plain_purity']):+.1f}"
        extra = (f"{100 * r['candidate_purity']:.1f}% |" if key == "k_prime"
                 else f"{r['bank_rows_per_cluster']:.1f} | {100 * r['short_sets']:.0f}% |")
        lines.append(f"| {label} | {100 * r['purity']:.1f}% | {gap} | {extra}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--k_primes", default="5,10,20,50,100,200,500", help="2Q: k' values replayed")
    parser.add_argument("--clusters", default="", help="KM: cluster counts re-clustered and replayed")
    parser.add_argument("--seed", type=int, default=0, help="KM: k-means seed of the sweep")
    parser.add_argument("--out", default="", help="also write the report as JSON here")
    args = parser.parse_args()
    ints = lambda text: [int(v) for v in text.split(",") if v.strip()]
    flags, step, state = load_state(args.model_dir)
    report = analyse(flags, state, ints(args.k_primes), ints(args.clusters), args.seed)
    report.update(run=os.path.basename(os.path.normpath(args.model_dir)), step=step,
                  command="python tools/constraint_purity.py " + " ".join(sys.argv[1:]))
    print(markdown(report))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
