"""How many directions a representation uses.

A network can score well on its training loss while its features crowd into a few directions
(dimensional collapse, common in BYOL-style methods without negatives); k-NN then loses the
distinctions the collapsed directions carried. RankMe (Garrido et al., "RankMe: Assessing the
downstream performance of pretrained self-supervised representations by their rank", ICML 2023)
counts the directions in use without labels: the exponential of the entropy of the normalised
singular values, between 1 (one direction) and min(N, D) (all equally used).
"""

import numpy as np

# Enough rows for a stable spectrum of a 2,048-d feature, and an SVD of seconds on a CPU core.
MAX_ROWS = 20_000


def rankme(features, max_rows=MAX_ROWS, eps=1e-7):
    """RankMe of float [N, D] features (as given: the callers pass the unit-length features k-NN
    searches): exp(-sum p log p), p_k = sigma_k / sum(sigma) + eps, over the singular values sigma of
    the uncentred matrix, as the paper defines it. Above `max_rows` rows an evenly spaced subset is
    used. NaN for an empty or all-zero matrix."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or x.size == 0:
        return float("nan")
    if len(x) > max_rows:
        x = x[np.linspace(0, len(x) - 1, max_rows).astype(np.int64)]
    sigma = np.linalg.svd(x, compute_uv=False)
    if sigma.sum() <= 0:
        return float("nan")
    p = sigma / sigma.sum() + eps
    return float(np.exp(-np.sum(p * np.log(p))))
