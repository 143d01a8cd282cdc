"""MSF (Mean Shift): pull the query towards the top-k neighbours of its target in the bank."""

from cmsf_tf.methods.base import MeanShift


class MSF(MeanShift):
    """No constraint: MeanShift's default `neighbour_sets` (the unconstrained top-k) is MSF."""
