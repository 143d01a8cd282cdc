"""knn: 1-NN / 20-NN top-1 (top-5 for k >= 5) of L2-normalised backbone features, ScaNN retrieval
(exact brute force or approximate), majority or weighted vote; the index is every training image or the
labelled subset of a label split (semi-supervised 1-NN). Also the RankMe of the index's features."""

from cmsf_tf.errors import UserError
from cmsf_tf.settings import POSITIVE, Setting, integers

NAME = "knn"
SETTINGS = (
    Setting("knn_k", "list", ["1", "20"],
            "knn: numbers of neighbours.", convert=integers(1)),
    Setting("knn_vote", "string", "majority",
            "knn: majority (the paper's code) or weighted (exp(sim / T) per "
            "neighbour, T = --knn_temperature).", choices=("majority", "weighted")),
    Setting("knn_temperature", "float", 0.07,
            "knn: temperature of the weighted vote.", rule=POSITIVE),
    Setting("knn_search", "string", "exact",
            "knn: ScaNN brute force (exact) or tree + hashing + re-ranking (approx).", choices=("exact", "approx")),
    Setting("index_split", "string", "all",
            "knn: the index is all training images, or only the labelled ones of "
            "--label_split (semi-supervised 1-NN).", choices=("all", "labelled")),
)


def index_source(ctx):
    """(source, keep, subset, count) of the k-NN index: the training images (their labelled part with
    --index_split=labelled); for unlabelled training images, the labelled val/ split in two."""
    cfg, dataset, source = ctx.cfg, ctx.dataset, ctx.source()
    if not source.has_train_labels():
        if cfg.index_split == "labelled":
            raise UserError(source.no_labels_reason(dataset, "--index_split=labelled"))
        unlabelled, source = source, source.knn_source()
        if source is None:
            raise UserError(unlabelled.no_labels_reason(dataset, "k-NN evaluation"))
        ctx.log(f"{dataset}'s training images have no labels: k-NN over the labelled val/ split "
                f"({source.num_train} images as the index, {source.num_test} as queries)")
    keep, subset, count = None, "all", None
    if cfg.index_split == "labelled":
        if not ctx.label_split:
            raise UserError("--index_split=labelled needs a --label_split (the run has none)")
        _, keep, subset, count = ctx.labelled_subset(source)
    return source, keep, subset, count


def run(ctx, cfg, log):
    from cmsf_tf.eval import knn, spectrum

    source, keep, subset, count = index_source(ctx)
    index, index_labels = ctx.features(source, ctx.dataset, "train", keep, subset, count)
    queries, query_labels = ctx.features(source, ctx.dataset, "test")
    if max(cfg.knn_k) > len(index):
        raise UserError(f"--knn_k {max(cfg.knn_k)} is larger than the index ({len(index)} images)")
    log(f"k-NN ({cfg.knn_search} search, {cfg.knn_vote} vote) over {len(index)} images ...")
    report = knn.knn_report(index, index_labels, queries, query_labels, ks=cfg.knn_k,
                            num_classes=source.num_classes, mode=cfg.knn_search, vote=cfg.knn_vote,
                            temperature=cfg.knn_temperature)
    k = max(cfg.knn_k)  # the headline numbers are the largest k's
    headline = {"top1": report[f"knn_top1_k{k}"]}
    if f"knn_top5_k{k}" in report:
        headline["top5"] = report[f"knn_top5_k{k}"]
    return {**headline, **report, "rankme": round(spectrum.rankme(index), 2), "feature_dim": ctx.encoder.feature_dim,
            "dataset": ctx.dataset, "index_size": len(index), "queries": len(queries),
            "settings": {"k": list(cfg.knn_k), "vote": cfg.knn_vote, "temperature": cfg.knn_temperature,
                         "search": cfg.knn_search, "index_split": subset}}


def summary_lines(result):
    from cmsf_tf.eval.protocols import accuracy_lines

    lines = accuracy_lines(result)
    lines += [f"  {key}: {100 * result[key]:.2f}%" for key in sorted(k for k in result if k.startswith("knn_top"))]
    lines.append(f"  RankMe of the index's features: {result['rankme']:.1f} of {result['feature_dim']} dimensions")
    return lines
