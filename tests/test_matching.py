import itertools

import numpy as np
import pytest
import torch

from ovseg_core.matching import Match, match_nouns_to_proposals


def normalise(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def features_with_scores(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit proposal/noun features whose cosine matrix [N, P] is `scores` (values in [-1, 1])."""
    n, p = scores.shape
    proposals = np.eye(p, n + p)  # orthonormal proposals
    residual = np.sqrt(np.clip(1 - (scores**2).sum(axis=1), 0, None))
    assert np.all((scores**2).sum(axis=1) <= 1 + 1e-9), "rows must have norm <= 1"
    nouns = np.zeros((n, n + p))
    nouns[:, :p] = scores
    nouns[np.arange(n), p + np.arange(n)] = residual  # a private direction fills each noun to norm 1
    return proposals, nouns


def test_each_noun_gets_its_best_proposal():
    rng = np.random.default_rng(0)
    proposals = normalise(rng.normal(size=(6, 16)))
    truth = [4, 0, 4, 2]  # two nouns may share a proposal
    nouns = normalise(proposals[truth] + 0.05 * rng.normal(size=(4, 16)))
    matches = match_nouns_to_proposals(proposals, nouns)
    assert [m.noun_index for m in matches] == [0, 1, 2, 3]
    assert [m.proposal_index for m in matches] == truth
    for m in matches:
        assert m.score == pytest.approx(float(nouns[m.noun_index] @ proposals[m.proposal_index]))
        assert m.score == pytest.approx(float((nouns[m.noun_index] @ proposals.T).max()))


def test_threshold_drops_weak_matches():
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.25, 0.1], [0.0, 0.3, 0.6]])
    proposals, nouns = features_with_scores(scores)
    assert [tuple(m)[:2] for m in match_nouns_to_proposals(proposals, nouns)] == [(0, 0), (1, 1), (2, 2)]
    kept = match_nouns_to_proposals(proposals, nouns, score_threshold=0.5)
    assert [(m.noun_index, m.proposal_index) for m in kept] == [(0, 0), (2, 2)]
    assert [m.score for m in kept] == pytest.approx([0.9, 0.6])


def test_one_noun_per_proposal_maximises_total_score():
    # both nouns prefer proposal 0; the greedy choice would give it to both
    scores = np.array([[0.9, 0.1], [0.8, 0.6]])
    proposals, nouns = features_with_scores(scores)
    greedy = match_nouns_to_proposals(proposals, nouns)
    assert [m.proposal_index for m in greedy] == [0, 0]
    unique = match_nouns_to_proposals(proposals, nouns, one_noun_per_proposal=True)
    assert [(m.noun_index, m.proposal_index) for m in unique] == [(0, 0), (1, 1)]
    # both prefer proposal 0 again; noun-by-noun greedy would give it to noun 0 (0.6 + 0.1), the
    # assignment gives it to noun 1 (0.55 + 0.8 is the larger total)
    scores = np.array([[0.6, 0.55, 0.0], [0.8, 0.1, 0.1]])
    proposals, nouns = features_with_scores(scores)
    unique = match_nouns_to_proposals(proposals, nouns, one_noun_per_proposal=True)
    assert [(m.noun_index, m.proposal_index) for m in unique] == [(0, 1), (1, 0)]


def brute_force_best(scores: np.ndarray) -> float:
    """Best total score over all one-to-one assignments of min(N, P) pairs."""
    n, p = scores.shape
    if n <= p:
        return max(sum(scores[i, c] for i, c in enumerate(cols)) for cols in itertools.permutations(range(p), n))
    return max(sum(scores[r, j] for j, r in enumerate(rows)) for rows in itertools.permutations(range(n), p))


def test_one_noun_per_proposal_equals_brute_force():
    rng = np.random.default_rng(1)
    for n, p in [(3, 5), (4, 4), (5, 3)]:
        proposals = normalise(rng.normal(size=(p, 8)))
        nouns = normalise(rng.normal(size=(n, 8)))
        matches = match_nouns_to_proposals(proposals, nouns, one_noun_per_proposal=True)
        assert len(matches) == min(n, p)
        assert len({m.proposal_index for m in matches}) == len(matches)
        best = brute_force_best(nouns @ proposals.T)
        assert sum(m.score for m in matches) == pytest.approx(best)


def test_assignment_maximises_pairs_above_threshold_first():
    # unconstrained, the best total is (0->0, 1->1) = 1.25, but 1->1 is under the threshold and would
    # be dropped, leaving one pair; (0->1, 1->0) keeps two pairs above it
    scores = np.array([[0.8, 0.52], [0.55, 0.45]])
    proposals, nouns = features_with_scores(scores)
    got = match_nouns_to_proposals(proposals, nouns, score_threshold=0.5, one_noun_per_proposal=True)
    assert [(m.noun_index, m.proposal_index) for m in got] == [(0, 1), (1, 0)]
    without = match_nouns_to_proposals(proposals, nouns, one_noun_per_proposal=True)
    assert [(m.noun_index, m.proposal_index) for m in without] == [(0, 0), (1, 1)]
    # with a threshold no one reaches, nothing is matched
    assert match_nouns_to_proposals(proposals, nouns, score_threshold=0.95, one_noun_per_proposal=True) == []


def test_torch_inputs_and_edge_cases():
    proposals = torch.nn.functional.normalize(torch.randn(5, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    matches = match_nouns_to_proposals(proposals, proposals[[3, 1]])
    assert [(m.noun_index, m.proposal_index) for m in matches] == [(0, 3), (1, 1)]
    assert all(isinstance(m, Match) and m.score == pytest.approx(1.0) for m in matches)
    assert match_nouns_to_proposals(proposals[:0], proposals) == []
    assert match_nouns_to_proposals(proposals, proposals[:0], one_noun_per_proposal=True) == []
    with pytest.raises(ValueError, match="normalised"):
        match_nouns_to_proposals(proposals * 2, proposals)
    with pytest.raises(ValueError, match="dims differ"):
        match_nouns_to_proposals(proposals, torch.nn.functional.normalize(torch.randn(2, 4), dim=1))
    with pytest.raises(ValueError, match="matrix"):
        match_nouns_to_proposals(proposals[0], proposals)
