#!/usr/bin/env bash
# The Fashion-MNIST runs behind the README's "Paper fidelity" numbers (demo budget: ResNet-18 width 16,
# 28 px, 10 epochs, 2 CPU cores), run one after the other from the repository root:
#   bash results/fmnist_fidelity/run.sh
# Each run's result.json and eval/*.json are copied next to this script (<run>_result.json, <run>_<protocol>.json).
set -u
OUT=results/fmnist_fidelity
RUNS=${RUNS:-runs/fidelity}
PY=${PY:-.venv/bin/python}
export TF_CPP_MIN_LOG_LEVEL=2
mkdir -p "$RUNS"
keep() {  # run name, protocol
  cp "$RUNS/$1/eval/$2.json" "$OUT/$1_$2.json"
}
train() {  # run name, flags...
  local name=$1; shift
  [ -f "$RUNS/$name/result.json" ] || $PY -m cmsf_tf.train "$@" --model_dir="$RUNS/$name" > "$RUNS/$name.log" 2>&1
  cp "$RUNS/$name/result.json" "$OUT/${name}_result.json"
}
# 1. MSF, the demo recipe (new crop sampler and jitter order).
train msf --flagfile=flags/demo.cfg
# 2. CMSF-Pseudo with 10% labels, and the paper's semi-supervised protocol on it and on MSF.
train semi10 --flagfile=flags/semi10_fmnist.cfg
$PY -m cmsf_tf.evaluate semi --model_dir="$RUNS/semi10" > /dev/null && keep semi10 semi
$PY -m cmsf_tf.evaluate semi --model_dir="$RUNS/msf" --label_split=percent:10 > /dev/null && keep msf semi
# 3. The fill rule of a constrained set with fewer than k rows: CMSF-KM at the paper's ratio of images to
#    clusters (ImageNet: 1.28 M / 50,000 = 25.6; here 60,000 / 2,400 = 25) and of bank to data set.
train km2400_nearest --flagfile=flags/demo.cfg --method=cmsf_km --num_clusters=2400 --noknn_baselines
train km2400_official --flagfile=flags/demo.cfg --method=cmsf_km --num_clusters=2400 --noknn_baselines --constraint_fill=official
# 4. The paper's linear probe (augmented views, wd 1e-4, best and last epoch) and the cached-feature probe.
$PY -m cmsf_tf.evaluate linear --model_dir="$RUNS/msf" --nolinear_augment > /dev/null && cp "$RUNS/msf/eval/linear.json" "$OUT/msf_linear_cached.json"
$PY -m cmsf_tf.evaluate linear --model_dir="$RUNS/msf" > /dev/null && keep msf linear
