"""tools/memory_plan.py: the plan built without allocating (a tf.Graph) counts exactly what a built
model holds, and its activation estimate is the kept tensors' size."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from cmsf_tf import config
from cmsf_tf.methods import METHODS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import memory_plan  # noqa: E402


def _tiny(method, **kw):
    return config.make(method=method, arch="resnet18_small", width=4, image_size=16, batch_size=8, bank_size=64,
                       **kw)


def _nbytes(variables):
    return sum(int(np.prod(v.shape)) * tf.as_dtype(v.dtype).size for v in variables)


@pytest.mark.parametrize("method,extra", [("msf", {}), ("cmsf_2q", {"pool_dtype": "bfloat16"}),
                                          ("cmsf_km", {}), ("cmsf_sup", {}), ("xent", {})])
def test_plan_counts_what_a_built_model_and_its_optimizer_hold(method, extra):
    cfg = _tiny(method, **extra)
    planned = memory_plan.plan(cfg, replicas=2, num_images=40, num_classes=10)
    model = METHODS[method].from_run_config(cfg, sync_bn=False, num_images=40, num_classes=10)
    optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
    trained = getattr(model, "online_variables", None) or model.trainable_variables
    optimizer.build(trained)
    momentum = [v for v in optimizer.variables if "momentum" in v.path]
    assert len(momentum) == len(trained)
    assert sum(planned["state"].values()) == _nbytes(model.weights) + _nbytes(momentum)
    assert planned["state"]["optimizer (SGD momentum)"] == _nbytes(momentum)
    if method == "cmsf_2q":  # the pool: one row per image and slot, in its own dtype
        assert planned["state"]["pool"] == _nbytes(model.pool.weights)
        assert model.pool.embeddings.dtype == "bfloat16"
    assert planned["per_replica_batch"] == 4
    assert planned["search"] == (0 if method == "xent" else
                                 (2 if method == "cmsf_2q" else 1) * 4 * cfg.bank_size * 4)
    assert planned["total"] == sum(planned["state"].values()) + planned["activations"] + planned["search"]


def test_activations_are_the_tensors_the_gradient_keeps():
    """On a two-layer network the kept tensors are known: the matmuls' inputs, BatchNorm's input, the ReLU's
    output (float32, per image), nothing else."""
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [2, 5])
        start = len(graph.get_operations())
        h = tf.matmul(x, tf.ones([5, 7]))  # keeps x: 5 floats per image
        h = tf.compat.v1.nn.fused_batch_norm(tf.reshape(h, [2, 1, 1, 7]), tf.ones([7]), tf.zeros([7]))[0]  # h: 7
        h = tf.nn.relu(tf.reshape(h, [2, 7]))  # its output: 7
        tf.matmul(h, tf.ones([7, 3]))  # keeps the ReLU's output (the same tensor, counted once)
        assert memory_plan._kept_bytes(graph, start, per_image=2) == (5 + 7 + 7) * 4


def test_plan_scales_with_the_per_replica_batch_and_refuses_an_uneven_split():
    cfg = _tiny("msf")
    one, two = (memory_plan.plan(cfg, replicas=r, num_images=40, num_classes=10) for r in (1, 2))
    assert one["state"] == two["state"]  # mirrored: every replica holds all of it
    assert one["activations"] == 2 * two["activations"] > 0 and one["search"] == 2 * two["search"]
    assert memory_plan.for_replicas(one, cfg.batch_size, 2) == two  # what the docs' table uses
    with pytest.raises(config.UsageError, match="does not divide over 3 replicas"):
        memory_plan.plan(cfg, replicas=3, num_images=40, num_classes=10)


def test_cli_plans_an_imagenet_recipe_without_its_data(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "memory_plan.py"),
                          "--flagfile=" + os.path.join(ROOT, "flags", "cmsf_2q.cfg"), "--replicas=8"],
                         capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    pool = next(line for line in out.stdout.splitlines() if line.strip().startswith("pool "))
    # 1,281,167 images x 2 slots x 512 float32, and an int32 write count per image: 5.25 GB on every replica
    assert abs(float(pool.split()[1]) - 1_281_167 * (2 * 512 * 4 + 4) / 1e9) < 0.001
    assert "32 image(s) per replica" in out.stdout


def test_measuring_where_the_allocator_keeps_no_statistics_is_one_sentence(tmp_path):
    """TensorFlow's plain CPU allocator (oneDNN off and no BFC allocator asked for) keeps no statistics:
    --measure_size then says what to set instead of a ValueError's traceback."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPU_ALLOCATOR_USE_BFC"}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "memory_plan.py"), "--method=msf",
                          "--arch=resnet18_small", "--width=4", "--image_size=16", "--batch_size=8", "--bank_size=64",
                          "--num_images=64", "--num_classes=10", "--measure_size=16", "--measure_batch=4"],
                         capture_output=True, text=True, timeout=300, cwd=str(tmp_path),
                         env=dict(env, TF_ENABLE_ONEDNN_OPTS="0", TF_CPP_MIN_LOG_LEVEL="3"))
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    error = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "keeps no memory statistics" in error[0] and "TF_ENABLE_ONEDNN_OPTS=1" in error[0]


def test_recipe_config_reads_a_recipe_as_train_does():
    """--scale_doc's recipes: nested --flagfile lines resolved, this file's lines and the overrides last."""
    cfg = memory_plan.recipe_config("semi10_mixed", pool_dtype="bfloat16")
    assert (cfg.method, cfg.dataset, cfg.arch) == ("cmsf_pseudo", "tfds:imagenet2012", "resnet50")  # semi10.cfg
    assert (cfg.mixed_precision, cfg.batch_size, cfg.bank_size) == ("float16", 768, 128256)  # its own lines
    assert cfg.pool_dtype == "bfloat16"
    assert memory_plan.recipe_config("msf").mixed_precision == "float32"  # nothing carried over between recipes


MEASURE = """
import json, sys
sys.path.insert(0, sys.argv[1])
import memory_plan
from cmsf_tf import config
cfg = config.make(method=sys.argv[2], arch="resnet18_small", width=16, image_size=32, batch_size=16, bank_size=128)
print(json.dumps([memory_plan.measured_activations(cfg, 32, batch) for batch in (8, 16)]))
"""


@pytest.mark.parametrize("method", ["msf", "xent"])
def test_the_activation_estimate_agrees_with_the_allocator_peak_of_a_real_step(method):
    """One forward and backward pass measured with TensorFlow's allocator statistics, against the kept-tensor
    estimate at the same size (ResNet-50 at 64 px: 6.7 vs 7.3 MB per image, ratio 0.91; here a width-16
    ResNet-18 at 32 px: 0.79-0.89, the order in which the inter-op pool runs independent ops moves the peak
    by a few %). Per image, the measurement does not depend on the batch. Measured with oneDNN's CPU kernels,
    whose allocator keeps the statistics (TensorFlow turns them on by itself only on CPUs with AVX-512
    VNNI/BF16 or AMX; its Eigen kernels' allocator keeps none), hence a process of its own."""
    out = subprocess.run([sys.executable, "-c", MEASURE, os.path.join(ROOT, "tools"), method], capture_output=True,
                         text=True, timeout=300, env=dict(os.environ, TF_ENABLE_ONEDNN_OPTS="1", PYTHONPATH=ROOT,
                                                          TF_CPP_MIN_LOG_LEVEL="3"))
    assert out.returncode == 0, out.stderr[-2000:]
    (measured, estimated), (twice, _) = json.loads(out.stdout.strip().splitlines()[-1])
    print("measured / estimated per image:", measured, estimated, measured / estimated)
    assert 0.65 < measured / estimated < 1.35
    assert 0.8 < twice / measured < 1.25  # per image: the same whatever the batch


def test_small_crops_add_their_own_online_pass_to_the_activations():
    cfg = _tiny("msf")
    plain = memory_plan.plan(cfg, replicas=1, num_images=40, num_classes=10)
    crops = memory_plan.plan(config.make(**{**cfg.to_dict(), "multi_crop": "4:8:0.1:0.3"}), replicas=1,
                             num_images=40, num_classes=10)
    assert crops["state"] == plain["state"]  # queries only: no new state
    # 4 crops of 8 px hold about 4 x (8 / 16)^2 = 1 image of 16 px more (the stem's share rounds it).
    ratio = crops["activations"] / plain["activations"]
    assert 1.6 < ratio < 2.4, ratio
