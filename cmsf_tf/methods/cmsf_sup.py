"""Supervised CMSF: the neighbours are searched only among bank rows with the query's training label.

The bank stores each row's training label (noisy when --label_noise is set) next to its true label, so
the purity against the truth shows what the noise does. When a label has fewer than k rows in the bank
the remaining neighbours are the query's nearest rows of other classes (ops.DISALLOWED_PENALTY), so the
loss always averages over k rows; --constraint_fill=official fills with arbitrary rows instead, as the
paper's code does (it sets the distance of every other row to 5.0, so they tie).
"""

from cmsf_tf.methods.base import MeanShift


class CMSFSup(MeanShift):
    needs_labels = True

    def neighbour_sets(self, batch, targets, sims):
        return [(1.0, self.label_neighbours(sims, batch["label"], self.bank.labels))]
