"""The evaluation protocols: protocol name -> its module.

A protocol is one module here with
  NAME                     the command (`python -m cmsf_tf.evaluate NAME`)
  SETTINGS                 its own command-line rows (cmsf_tf.settings.Setting); the command line defines
                           these and the common ones (cmsf_tf.config.EVAL_COMMON) and no others
  check(cfg)               optional: checks across its settings, raising a UserError
  run(ctx, cfg, log)       the evaluation: ctx is the EvalContext (network, data, labels, cached features);
                           returns the JSON-able result (top1 where it has one)
  summary_lines(result)    the lines printed after the JSON
and one line in PROTOCOLS below. The modules import TensorFlow inside `run` only, so the command line
checks every flag first.
"""

from cmsf_tf.eval.protocols import finetune, knn, linear, projector, semi, transfer

PROTOCOLS = {module.NAME: module for module in (knn, linear, semi, finetune, transfer, projector)}


def accuracy_lines(result):
    """The headline: top-1 (and top-5), with the best and the last epoch where a head was trained."""
    lines = [f"{result['protocol']}: top-1 {100 * result['top1']:.2f}%"
             + (f", top-5 {100 * result['top5']:.2f}%" if "top5" in result else "")]
    if "best_epoch" in result:
        lines.append(f"  best epoch {result['best_epoch']} (chosen on the test split, as the paper's code does); "
                     f"last epoch: top-1 {100 * result['top1_last']:.2f}%")
    return lines
