"""Pair each caption noun with its best-matching mask proposal (OVSeg §3.2: "we use CLIP to pair the
most matching mask proposal to each class").

The score of a (noun, proposal) pair is the cosine similarity of the proposal's CLIP image feature
(of its masked crop) and the noun's CLIP text feature; both come in L2-normalised.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

_NORM_TOLERANCE = 1e-3


class Match(NamedTuple):
    noun_index: int
    proposal_index: int
    score: float


def _as_matrix(x: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
    a = x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a [count, dim] matrix, got shape {a.shape}")
    if len(a) and not np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=_NORM_TOLERANCE):
        raise ValueError(f"{name} rows must be L2-normalised (CLIP features after normalisation)")
    return a


def match_nouns_to_proposals(
    proposal_features: torch.Tensor | np.ndarray,
    noun_features: torch.Tensor | np.ndarray,
    score_threshold: float | None = None,
    one_noun_per_proposal: bool = False,
) -> list[Match]:
    """Best proposal for each noun, as `Match(noun_index, proposal_index, score)` sorted by noun.

    proposal_features: [P, D], noun_features: [N, D], rows L2-normalised.
    score_threshold: drop pairs whose cosine similarity is below it.
    one_noun_per_proposal: a proposal goes to at most one noun, by the Hungarian algorithm: the
        assignment with the most pairs at or above the threshold, and among those the highest total
        score (nouns left without a proposal, when N > P or under the threshold, are dropped).
    """
    proposals = _as_matrix(proposal_features, "proposal_features")
    nouns = _as_matrix(noun_features, "noun_features")
    if proposals.shape[1] != nouns.shape[1]:
        raise ValueError(f"feature dims differ: proposals {proposals.shape[1]}, nouns {nouns.shape[1]}")
    if not len(proposals) or not len(nouns):
        return []
    scores = nouns @ proposals.T  # [N, P] cosine similarities
    allowed = scores >= score_threshold if score_threshold is not None else np.ones_like(scores, dtype=bool)

    if one_noun_per_proposal:
        # Each pair under the threshold costs more than any total of allowed scores can gain, so
        # the assignment first maximises the number of allowed pairs; the others are dropped after.
        penalty = -(2.0 * min(scores.shape) + 1.0)
        rows, cols = linear_sum_assignment(np.where(allowed, scores, penalty), maximize=True)
    else:
        rows = np.arange(len(nouns))
        cols = scores.argmax(axis=1)
    return [Match(int(n), int(p), float(scores[n, p])) for n, p in zip(rows, cols) if allowed[n, p]]
