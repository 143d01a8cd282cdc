"""Strategy selection and the cross-replica gather that keeps memory banks identical on every replica."""

import contextlib

import tensorflow as tf


def cpu_flags():
    """The x86 feature flags of this machine's CPU (Linux's /proc/cpuinfo), or None where it cannot tell."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), None)
    except OSError:
        return None
    return set(line.split(":", 1)[1].split()) if line else None


def onednn_on():
    """Whether this process's TensorFlow runs its oneDNN CPU kernels (False where it cannot say)."""
    try:
        from tensorflow.python.util import _pywrap_util_port  # no public API answers this

        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):
        return False


def nondeterministic_cpu_kernels(onednn, flags):
    """Whether --deterministic cannot hold on this CPU: oneDNN's kernels (TF_ENABLE_ONEDNN_OPTS=1) on an x86 CPU
    without AVX-512, where two identical --deterministic runs of 2 epochs of the test network differed (BatchNorm
    moving variances by up to 0.024; docs/resume.md). TensorFlow turns oneDNN on by itself only on CPUs with
    AVX-512 VNNI/BF16 or AMX, where such runs agree bit for bit."""
    return bool(onednn) and flags is not None and "avx512f" not in flags


def eigen_kernels_hint(onednn, flags, env_value):
    """A start-up note for runs that do not need bit-exactness, or None: where TensorFlow left its oneDNN kernels
    off on an x86 CPU (it turns them on by itself only with AVX-512 VNNI/BF16 or AMX) and the user has not
    chosen either way, TF_ENABLE_ONEDNN_OPTS=1 is the largest speed lever there is on a CPU host: on a 2-core
    AMD EPYC it made the train step 1.5-1.9x and our input pipeline 2.0x as fast (bench/README.md). The
    library does not set it itself: the variable must be set before TensorFlow loads, and on a CPU without
    AVX-512 it costs --deterministic (docs/resume.md)."""
    if onednn or flags is None or env_value not in (None, ""):
        return None
    return ("note: TensorFlow runs its Eigen CPU kernels on this CPU; TF_ENABLE_ONEDNN_OPTS=1 made training "
            "1.5-2x as fast on such a CPU (docs/resume.md)"
            + (", at the cost of bit-exact --deterministic runs" if nondeterministic_cpu_kernels(True, flags) else ""))


def configure_cpu_devices(n):
    """Split the CPU into n logical devices (for testing multi-replica code without accelerators).

    Must run before TensorFlow creates any device, i.e. before the first op."""
    if n > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n)


def make_strategy(name, cpu_devices=1, tpu=""):
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        if gpus:
            return tf.distribute.MirroredStrategy()
        cpus = [d.name for d in tf.config.list_logical_devices("CPU")][:max(cpu_devices, 1)]
        return tf.distribute.MirroredStrategy(cpus)
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(f"unknown strategy {name!r}")


def is_multi_worker(strategy=None):
    return isinstance(strategy or tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy)


def is_chief(strategy):
    """Whether this process writes the run's files (checkpoints, summaries, result.json)."""
    if not is_multi_worker(strategy):
        return True
    resolver = strategy.cluster_resolver
    return resolver.task_type in (None, "chief") or (resolver.task_type == "worker" and resolver.task_id == 0
                                                     and "chief" not in resolver.cluster_spec().as_dict())


def gather(*tensors):
    """All-gathers each per-replica tensor along axis 0, in replica-id order.

    Called inside the train step before writing a bank, so that every replica writes the same, complete
    set of rows. `tf.identity` first: CPU collectives on a raw input tensor inside tf.function fail with
    "destinations can not be empty" under MultiWorkerMirroredStrategy."""
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return tensors
    return tuple(ctx.all_gather(tf.identity(t), axis=0) for t in tensors)


def resolve_jit_compile(setting, strategy_name, deterministic=False):
    """Whether a run compiles with XLA, from --jit_compile ("auto", "true", "false"; config refuses the
    combinations that cannot compile). auto: always under TPUStrategy (it compiles every step with XLA
    whatever Keras is told); on the default strategy with a GPU; never on CPUs, where the compiled step
    was 2-3x slower (docs/accelerators.md), nor under mirrored/multi_worker (their step cannot be compiled per
    replica), nor with --deterministic (Keras turns XLA off under op determinism)."""
    if strategy_name == "tpu":
        return True
    if setting != "auto":
        return setting == "true"
    return strategy_name == "default" and not deterministic and bool(tf.config.list_logical_devices("GPU"))


def view_dtype(strategy):
    """The dtype of the training views the input pipeline hands the step: uint8 pixel levels, or bfloat16
    levels under TPUStrategy (TPUs take no uint8 input; every level 0-255 is exact in bfloat16, at half
    of float32's bytes)."""
    return tf.bfloat16 if isinstance(strategy, tf.distribute.TPUStrategy) else tf.uint8


def on_first_device(strategy):
    """A device scope on the strategy's first compute device (a TPU core, the first GPU, the first logical
    CPU) for work that runs outside the replicas: the epoch-end k-means and the k-NN features. Under
    TPUStrategy ops and functions called outside strategy.run would otherwise run on the host's CPU,
    with the TPU's variables copied over. The default strategy keeps TensorFlow's own placement."""
    try:
        device = strategy.extended.worker_devices[0]
    except RuntimeError:  # the default strategy has no device list
        return contextlib.nullcontext()
    return tf.device(device)
