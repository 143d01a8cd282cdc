"""Evaluate a representation: python -m cmsf_tf.evaluate PROTOCOL --model_dir=RUN [--flags]

The network is the online backbone of the run's newest checkpoint (--checkpoint, --encoder=target, or
--saved_model for an export). Data: the run's data set and label split unless --dataset/--data_dir/
--label_split say otherwise. Each protocol writes --model_dir/eval/<protocol>.json (accuracies, the exact
settings, the network's origin and step, wall time) and TensorBoard scalars under tensorboard/eval.
The protocols (one module each in cmsf_tf/eval/protocols/, docs/evaluation.md):

  knn       1-NN / 20-NN top-1 (top-5 for k >= 5) of L2-normalised backbone features, ScaNN retrieval
  linear    the paper's linear probe (random resized crops, standardised features, SGD 40 epochs, lr 0.01,
            wd 1e-4, drops at 15/30; best and last epoch)
  semi      the paper's semi-supervised protocol: frozen backbone + MLP head on the labelled subset
            (--label_split), 20 epochs, lr 0.001, wd 1e-4; best and last epoch
  finetune  full fine-tuning: whole network + linear head on the labelled subset (not the paper's protocol)
  transfer  L2-regularised logistic regression (L-BFGS) on frozen features of other data sets, table + mean
  projector TensorBoard projector files (features, metadata.tsv, sprite) of a split, and eval/neighbours.png:
            the bank neighbours of some training images, plain beside the method's constrained set
"""

import json
import os
import sys
import time

from cmsf_tf import config
from cmsf_tf.errors import UserError
from cmsf_tf.eval.protocols import PROTOCOLS
from cmsf_tf.rundir import RunDir


class _Log:
    def __call__(self, message):
        print(message, file=sys.stderr, flush=True)


def load_encoder(cfg):
    """The network evaluated: a run's checkpoint (--checkpoint, --encoder) or an export (--saved_model)."""
    from cmsf_tf.eval import encoder as encoders

    if not os.path.isdir(cfg.model_dir) and not cfg.saved_model:
        raise UserError(f"--model_dir {cfg.model_dir} does not exist")
    if cfg.saved_model:
        enc = encoders.from_saved_model(cfg.saved_model)
    else:
        try:
            enc = encoders.from_checkpoint(cfg.model_dir, cfg.checkpoint or None, cfg.encoder)
        except encoders.NotARunError as e:  # only here is an export the other way in
            raise UserError(f"{e}, or an export with --saved_model") from None
    if cfg.image_size is not None and cfg.image_size != enc.image_size:
        raise UserError(f"the network takes {enc.image_size} px images, --image_size says {cfg.image_size}")
    return enc


def evaluate(cfg, log=_Log()):
    """Runs one protocol; returns the dict written to eval/<protocol>.json."""
    from cmsf_tf.eval.context import EvalContext

    started = time.time()
    enc = load_encoder(cfg)
    result = PROTOCOLS[cfg.protocol].run(EvalContext(cfg, enc, log), cfg, log)
    result = {"protocol": cfg.protocol, **result,
              "network": {k: v for k, v in enc.info.items() if k != "run"},
              "wall_time_s": round(time.time() - started, 1)}
    run = RunDir(cfg.model_dir)
    os.makedirs(run.eval_dir, exist_ok=True)
    with open(run.eval_result(cfg.protocol), "w") as f:
        json.dump(result, f, indent=2)
    write_summaries(cfg, result, enc.info.get("step") or 0)
    return result


def write_summaries(cfg, result, step):
    """The result's numbers as TensorBoard scalars eval/<protocol>/<name> at the network's step."""
    import tensorflow as tf

    writer = tf.summary.create_file_writer(RunDir(cfg.model_dir).eval_logdir)
    scalars = {k: v for k, v in result.items() if isinstance(v, float) and k != "wall_time_s"}
    for name, r in result.get("datasets", {}).items():
        scalars[f"top1_{name.replace(':', '_').replace('/', '_')}"] = r["top1"]
    with writer.as_default():
        for name, value in scalars.items():
            tf.summary.scalar(f"eval/{cfg.protocol}/{name}", value, step=step)
    writer.close()


def summary_lines(result):
    """The lines printed after the JSON: the protocol's own."""
    return PROTOCOLS[result["protocol"]].summary_lines(result)


def main(argv):
    if len(argv) != 2:
        print(f"usage: python -m cmsf_tf.evaluate {{{','.join(config.PROTOCOLS)}}} --model_dir=RUN [--flags]",
              file=sys.stderr)
        sys.exit(2)
    result = evaluate(config.eval_from_flags(argv[1]))
    print(json.dumps(result, indent=2))
    print("\n".join(summary_lines(result)))


def cli():
    """The `cmsf-evaluate` console script: `python -m cmsf_tf.evaluate`."""
    config.run_entry_point(main, "evaluate")


if __name__ == "__main__":
    cli()
