"""cmsf_tf: Constrained Mean Shift representation learning in Keras 3 / TensorFlow 2."""

import os

# TensorFlow turns its oneDNN CPU kernels on by itself only on CPUs with AVX-512 VNNI/BF16 or AMX; elsewhere
# (e.g. an AMD EPYC without AVX-512) it runs Eigen's, which took 1.5-1.9x as long for our train step
# (bench/README.md) and whose CPU allocator keeps no memory statistics (tools/memory_plan.py measures with
# them). Read when TensorFlow starts, so this must run before its first import; a value the user set stands.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

__version__ = "0.1.0"
