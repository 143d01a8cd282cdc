"""CMSF-2Q: constrain the neighbours of t to those that the previous view t' of the same image would
also choose.

A per-image pool keeps each image's two most recent target embeddings. After this step's targets are
written, the other slot holds t' (the previous view). A second bank M' parallel to the bank M holds,
for every row, the previous view of that row's image (written with the row, so M' costs no K x D
gather per step). Constraint set C = top-k' of t' in M'; constrained neighbours = the k rows of C most
similar to t in M (their similarities are gathered from the unconstrained search: O(B k')).
Loss = 1/2 constrained + 1/2 unconstrained. An image without a previous view (its first epoch) uses
its current view as t', so epoch 1 is MSF-like.

`third_view=True` is the paper's text variant: t' is the target of a third augmentation of the same
image, computed every step (one more target forward pass per image) instead of read from the pool, and
M' is a bank of those third views (row i of M' is the third view of the image whose weak view is row i
of M), so t' is searched among third views, as the paper describes.
"""

import tensorflow as tf

from cmsf_tf import ops
from cmsf_tf.memory import ImagePool, MemoryBank
from cmsf_tf.methods.base import MeanShift

class CMSF2Q(MeanShift):
    @classmethod
    def config_options(cls, cfg, num_images, num_classes):
        return dict(num_images=num_images, topk_prime=cfg.topk_prime, pool_dtype=cfg.pool_dtype,
                    third_view=cfg.cmsf_2q_view == "third")

    @classmethod
    def views(cls, cfg):
        return dict(super().views(cfg), third_view=cfg.cmsf_2q_view == "third")

    def __init__(self, *, num_images, topk_prime=5, pool_dtype="float32", third_view=False, **kwargs):
        super().__init__(**kwargs)
        if topk_prime < self.topk:
            raise ValueError(f"--topk_prime {topk_prime} must be at least --topk {self.topk}")
        self.topk_prime = int(topk_prime)
        self.third_view = bool(third_view)
        self.previous_bank = MemoryBank(self.bank.size, self.embedding_dim, seed=1, name="previous_bank")
        self.pool = None if third_view else ImagePool(num_images, self.embedding_dim, slots=2, dtype=pool_dtype,
                                                      name="pool")
        self.built = True

    def step_embeddings(self, batch, targets):
        return {"third_target": self.target_embedding(batch["third"])} if self.third_view else {}

    def write_state(self, targets, labels, true_labels, indices, is_labelled, third_target=None):
        if self.pool is None:
            previous = third_target  # M' is the bank of third views
        else:
            self.pool.write(indices, targets)
            previous = self.pool.previous(indices, fallback=targets)
        self.previous_bank.write(previous, labels, true_labels, indices)

    def previous_view(self, batch, targets):
        if self.pool is None:
            return batch["third_target"]
        return self.pool.previous(batch["index"], fallback=targets)

    def neighbour_sets(self, batch, targets, sims):
        constrained = ops.two_queue_neighbours(sims, self.previous_view(batch, targets),
                                               tf.convert_to_tensor(self.previous_bank.embeddings), self.topk,
                                               self.topk_prime)
        return [(0.5, constrained), (0.5, ops.top_k_indices(sims, self.topk))]
