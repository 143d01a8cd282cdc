"""cmsf_tf: Constrained Mean Shift representation learning in Keras 3 / TensorFlow 2."""

__version__ = "0.1.0"
