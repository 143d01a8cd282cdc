"""Neighbour-step benchmark: everything a mean-shift train step does between the bank write and the
optimizer, at the paper's scale, for every constraint, with cmsf_tf.ops (as the methods call them)
against the PyTorch formulation of the authors' code, timed alternately in one run.

    python tools/bench_nn.py                     # B 256, bank 128,000 x 512, k 5, k' 5, 1,000 classes
    python tools/bench_nn.py --quick             # tiny sizes (smoke test)

What is timed, per constraint (msf, 2q, label, km), from unit targets t, previous views t', queries q and
the bank: the similarity search(es), the constraint, the top-k, the loss and its gradient with respect
to q (the part of the backward pass that the neighbour formulation decides; --no_grad leaves it out).
- cmsf_tf: one [B, K] matmul for the targets; constraints on those similarities (2Q: top-k' of t' in the
  bank of previous views, then only the B x k' candidate similarities; label/km: a mask); the loss
  gathers the k chosen rows, so the query side costs O(B k D).
- authors (UCDvision/CMSF self_supervised/train_cmsf_self.py, supervised/train_cmsf_sup.py, semi_supervised/
  pseudo_cmsf.py): full [B, K] distance matrices for targets and queries (Dk, Dq), the constraint as a
  B x K scatter (2Q: -5 on the k' candidates) or a masked assignment (label: distance 5 elsewhere), top-k
  on Dk, gather from Dq; 2Q also gathers the K previous views from the per-image pool every step, and
  the label form also takes the unconstrained top-k (for its purity). The backward pass of the gather
  from Dq is another B x K x D matmul.
bfloat16 rows: bank (and pool) stored in bfloat16 and the similarity matmuls in bfloat16 on both sides.
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib  # noqa: E402

CONSTRAINTS = ("msf", "2q", "label", "km")


def make_data(args):
    rng = np.random.default_rng(0)

    def unit(n):
        x = rng.normal(size=(n, args.dim)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    n_images = args.bank * 2
    return dict(
        t=unit(args.batch), t_prev=unit(args.batch), q=unit(args.batch), bank=unit(args.bank),
        prev_bank=unit(args.bank), pool=unit(n_images),
        query_labels=rng.integers(0, args.classes, args.batch).astype(np.int32),
        bank_labels=rng.integers(0, args.classes, args.bank).astype(np.int32),
        batch_images=rng.integers(0, n_images, args.batch).astype(np.int64),
        bank_images=rng.integers(0, n_images, args.bank).astype(np.int64),
        cluster_ids=rng.integers(0, args.clusters, n_images).astype(np.int32),
    )


def tf_cases(data, args, dtype, xla=False):
    """{constraint: callable} running cmsf_tf.ops exactly as the methods' train steps call them."""
    import tensorflow as tf

    from cmsf_tf import ops

    k, kp = args.k, args.kprime
    c = {name: tf.constant(value) for name, value in data.items()}
    store = tf.bfloat16 if dtype == "bfloat16" else tf.float32
    bank, prev_bank = tf.cast(c["bank"], store), tf.cast(c["prev_bank"], store)

    def loss_grad(sets):
        q = c["q"]
        with tf.GradientTape() as tape:
            tape.watch(q)
            loss = tf.add_n([w * ops.mean_shift_loss(q, bank, idx) for w, idx in sets])
        return tape.gradient(loss, q) if args.grad else loss

    def msf():
        sims = ops.similarities(c["t"], bank)
        return loss_grad([(1.0, ops.top_k_indices(sims, k))])

    def two_q():
        sims = ops.similarities(c["t"], bank)
        candidates = ops.nearest_neighbours(c["t_prev"], prev_bank, kp)
        constrained = ops.nearest_among_from_sims(sims, candidates, k)
        return loss_grad([(0.5, constrained), (0.5, ops.top_k_indices(sims, k))])

    def label():
        sims = ops.similarities(c["t"], bank)
        allowed = ops.label_constraint(c["query_labels"], c["bank_labels"])
        return loss_grad([(1.0, ops.top_k_indices(sims, k, allowed))])

    def km():
        sims = ops.similarities(c["t"], bank)
        clusters = tf.gather(c["cluster_ids"], c["batch_images"])
        bank_clusters = tf.gather(c["cluster_ids"], c["bank_images"])
        allowed = ops.label_constraint(clusters, bank_clusters)
        return loss_grad([(0.5, ops.top_k_indices(sims, k, allowed)), (0.5, ops.top_k_indices(sims, k))])

    fns = {"msf": msf, "2q": two_q, "label": label, "km": km}
    compiled = {name: tf.function(fn, jit_compile=xla) for name, fn in fns.items()}
    return {name: (lambda f=f: f().numpy()) for name, f in compiled.items()}


def torch_cases(data, args, dtype):
    """{constraint: callable}: the authors' formulation, in PyTorch."""
    import torch

    k, kp = args.k, args.kprime
    d = {name: torch.from_numpy(value) for name, value in data.items()}
    store = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    M, M_prev_pool = d["bank"].to(store), d["pool"].to(store)
    index_queue = d["bank_images"]

    def distances(x, bank):
        return 2 - 2 * (x.to(store) @ bank.T).float()

    def backward(loss, q):
        if not args.grad:
            return loss.detach()
        loss.backward()
        return q.grad

    def msf():
        q = d["q"].clone().requires_grad_(True)
        Dk = distances(d["t"], M)
        Dq = distances(q, M)
        _, idx = Dk.topk(k, dim=1, largest=False)
        loss = torch.gather(Dq, 1, idx).mean(dim=1).mean()
        return backward(loss, q)

    def two_q():
        q = d["q"].clone().requires_grad_(True)
        Dk = distances(d["t"], M)
        Dq = distances(q, M)
        _, nn_unconstrained = Dk.topk(k, dim=1, largest=False)
        targets_prime = M_prev_pool[index_queue]  # the K previous views, gathered every step
        D_prime = distances(d["t_prev"], targets_prime)
        _, nn_prime = D_prime.topk(kp, dim=1, largest=False)
        mask = torch.zeros_like(Dk)
        mask.scatter_(1, nn_prime, -5 * torch.ones_like(Dk))
        Dk = Dk + mask
        _, nn_constrained = Dk.topk(k, dim=1, largest=False)
        loss = (torch.gather(Dq, 1, nn_constrained).sum(1).div(k).mean()
                + torch.gather(Dq, 1, nn_unconstrained).sum(1).div(k).mean()) / 2
        return backward(loss, q)

    def masked(query_labels, bank_labels, with_unconstrained_loss):
        q = d["q"].clone().requires_grad_(True)
        b, m = q.shape[0], M.shape[0]
        other = query_labels.unsqueeze(1).expand(b, m) != bank_labels.unsqueeze(0).expand(b, m)
        Dk = distances(d["t"], M)
        Dq = distances(q, M)
        _, nn_unconstrained = Dk.topk(k, dim=1, largest=False)
        Dk[torch.where(other)] = 5.0
        _, nn_constrained = Dk.topk(k, dim=1, largest=False)
        loss = torch.gather(Dq, 1, nn_constrained).mean(dim=1).mean()
        if with_unconstrained_loss:
            loss = (loss + torch.gather(Dq, 1, nn_unconstrained).mean(dim=1).mean()) / 2
        return backward(loss, q)

    def label():
        return masked(d["query_labels"], d["bank_labels"], False)

    def km():
        return masked(d["cluster_ids"][d["batch_images"]], d["cluster_ids"][index_queue], True)

    return {"msf": msf, "2q": two_q, "label": label, "km": km}


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--bank", type=int, default=128_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--kprime", type=int, default=5)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--clusters", type=int, default=50_000, help="km: k-means clusters (paper: 50,000)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--constraints", default=",".join(CONSTRAINTS))
    parser.add_argument("--no_grad", dest="grad", action="store_false",
                        help="forward only: leave out the loss's gradient with respect to the queries")
    parser.add_argument("--xla", action="store_true", help="also time cmsf_tf with jit_compile=True")
    benchlib.add_common_args(parser, quick_help="tiny sizes, one round (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.bank, args.dim, args.classes, args.clusters, args.rounds = 16, 512, 32, 10, 50, 1
    return args


def main(argv=None):
    args = parse(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    data = make_data(args)
    threads = benchlib.machine()["cores"]
    torch = benchlib.optional_torch(args.no_torch)
    if torch:
        torch.set_num_threads(threads)
    print(f"neighbour step{'' if args.grad else ' (forward only)'}: B {args.batch}, bank {args.bank:,} x {args.dim}, k {args.k}, k' {args.kprime}, "
          f"{args.classes:,} classes, {args.clusters:,} clusters; median of {args.rounds} alternating rounds, "
          f"{threads} threads")
    rows = []
    print(f"{'constraint':10s} {'dtype':9s} {'cmsf_tf ms':>11s} {'authors ms':>11s} {'ratio':>7s}"
          + (f" {'xla ms':>8s}" if args.xla else ""))
    for dtype in args.dtypes.split(","):
        ours = tf_cases(data, args, dtype)
        xla = tf_cases(data, args, dtype, xla=True) if args.xla else {}
        theirs = torch_cases(data, args, dtype) if torch else {}
        for name in args.constraints.split(","):
            cases = {"ours": ours[name]}
            if name in theirs:
                cases["authors"] = theirs[name]
            if name in xla:
                cases["xla"] = xla[name]
            times = benchlib.alternate(cases, args.rounds)
            row = {"constraint": name, "dtype": dtype, "cmsf_tf_ms": round(benchlib.median_ms(times["ours"]), 2)}
            if "authors" in times:
                row["authors_ms"] = round(benchlib.median_ms(times["authors"]), 2)
                row["ratio"] = round(row["cmsf_tf_ms"] / row["authors_ms"], 3)
            if "xla" in times:
                row["xla_ms"] = round(benchlib.median_ms(times["xla"]), 2)
            rows.append(row)
            print(f"{name:10s} {dtype:9s} {row['cmsf_tf_ms']:11.1f} {row.get('authors_ms', float('nan')):11.1f} "
                  f"{row.get('ratio', float('nan')):7.3f}" + (f" {row['xla_ms']:8.1f}" if "xla_ms" in row else ""))
    return benchlib.emit_json("bench_nn", rows, args.json, settings=vars(args),
                              versions=benchlib.versions("tensorflow", "torch"))


if __name__ == "__main__":
    main()
