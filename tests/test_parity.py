"""Our train step against the authors', without PyTorch: golden files written by tools/parity.py from its
PyTorch transcription of the official step (tools/parity_torch.py) hold the starting weights, state and
batches, and what the official step computed — each step's loss, neighbour sets and bank, and every weight
and BatchNorm statistic at the end. Rewrite them with `python tools/parity.py --golden=tests/data/parity`."""

import glob
import json
import os

import numpy as np
import pytest

from tests.conftest import REPO
from tools import parity

GOLDEN = os.path.join(REPO, "tests", "data", "parity")


def load(method):
    arrays = {}
    for name in ("init", method):  # init.npz: the online network every method starts from
        with np.load(os.path.join(GOLDEN, f"{name}.npz")) as f:
            arrays.update({k: f[k] for k in f.files})
    setup = json.loads(str(arrays["setup"]))
    weights, state, final, batches = {}, {}, {}, {}
    for key, value in arrays.items():
        kind, _, rest = key.partition("/")
        if kind == "init":
            part, _, name = rest.partition("/")
            weights.setdefault(part, {})[name] = value
        elif kind == "final":
            part, _, name = rest.partition("/")
            final.setdefault(part, {})[name] = value
        elif kind == "state":
            state[rest] = value
        elif kind.startswith("batch"):
            batches.setdefault(int(kind[5:]), {})[rest] = value
    return setup, weights, state, [batches[i] for i in sorted(batches)], final, arrays


def test_golden_files_cover_every_method():
    names = sorted(os.path.basename(p)[:-4] for p in glob.glob(os.path.join(GOLDEN, "*.npz")))
    assert names == sorted([*parity.METHODS, "init"])


@pytest.mark.parametrize("method", parity.METHODS)
def test_our_step_computes_the_authors_step(method):
    from cmsf_tf import convert

    setup, weights, state, batches, final, arrays = load(method)
    model = parity.build_ours(method, state, setup, weights)
    for i, batch in enumerate(batches):
        loss, sets, query_labels = parity.our_step(model, batch)
        want = arrays["expect/loss"][i]
        assert abs(loss - want) <= 1e-5 * abs(want), (method, i, loss, want)
        for s, ours in enumerate(sets[:len(arrays["expect/sets"][i])]):
            theirs = arrays["expect/sets"][i][s]
            assert [sorted(r) for r in ours.tolist()] == [sorted(r) for r in theirs.tolist()], (method, i, s)
        assert parity.deviation(model.bank.embeddings.numpy(), arrays["expect/bank"][i]) <= 1e-5, (method, i)
        if method == "cmsf_pseudo":
            np.testing.assert_array_equal(query_labels, arrays["expect/query_labels"][i])
    for part, tensors in final.items():
        ours = convert.torch_state_dict(getattr(model, part), part)
        worst = max((parity.deviation(ours[name], value), name) for name, value in tensors.items())
        assert worst[0] <= 1e-5, (method, part, worst)
