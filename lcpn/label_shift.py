"""Label-shift correction: re-estimate a node's class priors on an unlabelled batch (Saerens et al. 2002).

A head's probabilities carry the class mix it was trained on. A new catalogue drifts (more sarees,
fewer cufflinks), and a prior that is wrong for the batch pulls rare-in-training classes down. EM
re-estimates the batch's class mix from the head's own probabilities and reweights them:

    p'(y|x) ∝ p(y|x) * q(y) / prior(y),    q(y) = mean over the batch of p'(y|x),

repeated until ``q`` settles. ``prior`` is the head's own average probability on its training images
(the split's val mix is not train's, so val's mean prediction is the wrong start: with it EM
collapsed on the catalogue). In a tree each image counts towards a node's mix with the probability
that it reaches that node, so a node's mix is estimated from the images that belong to it, and
``adapt_tree`` works top-down.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .hierarchy import ROOT, Hierarchy

MAX_ITERATIONS = 100
TOLERANCE = 1e-6
FLOOR = 1e-6  # keeps a class the batch seems to lack from being ruled out for good


def adapt(
    probs: np.ndarray, prior: Sequence[float], weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """EM on one node: (the batch's probabilities under its estimated mix, that mix).

    ``probs`` is (images, classes); ``weights`` how much each image counts (default 1 each)."""
    probs = np.asarray(probs, dtype=np.float64)
    prior = np.clip(np.asarray(prior, dtype=np.float64), FLOOR, None)
    prior = prior / prior.sum()
    weights = np.ones(len(probs)) if weights is None else np.asarray(weights, dtype=np.float64)
    total = weights.sum()
    if total <= 0 or len(probs) == 0:
        return probs, prior
    mix = prior
    for _ in range(MAX_ITERATIONS):
        new = np.clip(weights @ _reweighted(probs, mix / prior) / total, FLOOR, None)
        new /= new.sum()
        settled = np.abs(new - mix).max() < TOLERANCE
        mix = new
        if settled:
            break
    return _reweighted(probs, mix / prior), mix


def _reweighted(probs: np.ndarray, ratio: np.ndarray) -> np.ndarray:
    """Each row of ``probs`` times ``ratio``, normalised: Bayes' rule under another class mix."""
    out = probs * ratio
    return out / out.sum(1, keepdims=True)


def adapt_tree(
    tree: Hierarchy, probs: Mapping[str, np.ndarray], priors: Mapping[str, Sequence[float]]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Every node's (images, children) probabilities adapted to the batch, top-down, and each node's
    estimated class mix.

    ``probs`` has every parent node's probabilities on every image of the batch (a node of one
    child may be left out); an image counts towards a child node's mix with its adapted
    probability of reaching it."""
    reach = {ROOT: np.ones(len(next(iter(probs.values()))))}
    out, mixes = {}, {}
    for node in tree.parents:  # top-down: a parent comes before its children
        if node not in probs:
            for child in tree.children[node]:
                reach[child] = reach[node]
            continue
        out[node], mixes[node] = adapt(probs[node], priors[node], reach[node])
        for i, child in enumerate(tree.children[node]):
            reach[child] = reach[node] * out[node][:, i]
    return out, mixes
