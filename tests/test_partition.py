"""Partition: hand-made scores give the hand-derived SAM masks for every selection x residual."""

import pytest
import torch

from sbtrainer.partition import partition, top_k_masks

# 3 members, 8 rows; k = 0.25 -> floor(2) rows per member.
SCORES = torch.tensor([
    [9.0, 8.0, 1.0, 1.0, 0.5, 0.2, 3.0, 0.1],   # highest: rows 0, 1   lowest: rows 7, 5
    [0.0, 7.0, 7.0, 2.0, 0.3, 0.2, 1.0, 0.4],   # highest: rows 1, 2 (tie 7 = 7 -> both)  lowest: rows 0, 5
    [1.0, 1.0, 1.0, 1.0, 5.0, 5.0, 5.0, 0.0],   # highest: rows 4, 5 (tie of three -> lower index)  lowest: 7, 0
])


def rows(*r):
    mask = torch.zeros(8, dtype=torch.bool)
    mask[list(r)] = True
    return mask


def test_top_k_ties_go_to_lower_index():
    top = top_k_masks(SCORES, 0.25, "highest")
    assert torch.equal(top, torch.stack([rows(0, 1), rows(1, 2), rows(4, 5)]))
    low = top_k_masks(SCORES, 0.25, "lowest")
    assert torch.equal(low, torch.stack([rows(5, 7), rows(0, 5), rows(0, 7)]))


@pytest.mark.parametrize(
    ("selection", "residual", "expected"),
    [
        # highest: T0={0,1} T1={1,2} T2={4,5}; D_i = union of the others; R (in no T) = {3, 6, 7}
        ("highest", "none", [(1, 2, 4, 5), (0, 1, 4, 5), (0, 1, 2)]),
        ("highest", "round_robin", [(1, 2, 4, 5, 3), (0, 1, 4, 5, 6), (0, 1, 2, 7)]),
        ("highest", "complement", [(1, 2, 4, 5, 6, 7), (0, 1, 4, 5, 3, 7), (0, 1, 2, 3, 6)]),
        # lowest: T0={5,7} T1={0,5} T2={0,7}; R = {1, 2, 3, 4, 6}
        ("lowest", "none", [(0, 5, 7), (0, 5, 7), (0, 5, 7)]),
        ("lowest", "round_robin", [(0, 5, 7, 1, 4), (0, 5, 7, 2, 6), (0, 5, 7, 3)]),
        ("lowest", "complement", [(0, 5, 7, 2, 3, 6), (0, 5, 7, 1, 3, 4), (0, 5, 7, 1, 2, 4, 6)]),
    ],
)
def test_partition_by_hand(selection, residual, expected):
    masks = partition(SCORES, 0.25, selection, residual)
    assert masks.dtype == torch.bool and masks.shape == (3, 8)
    assert torch.equal(masks, torch.stack([rows(*e) for e in expected]))


def test_fraction_edges():
    assert not partition(SCORES, 0.0).any()
    assert partition(SCORES, 1.0).all()
    assert top_k_masks(SCORES, 0.3, "highest").sum(1).tolist() == [2, 2, 2]  # floor(0.3 * 8) = 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(scores=torch.ones(8)), "shape"),
        (dict(fraction=1.5), "fraction"),
        (dict(selection="median"), "selection"),
        (dict(residual="all"), "residual"),
        (dict(scores=torch.tensor([[1.0, float("nan")], [0.0, 1.0]])), "finite"),
    ],
)
def test_bad_input(kwargs, match):
    args = dict(scores=SCORES, fraction=0.25, selection="highest", residual="none") | kwargs
    with pytest.raises(ValueError, match=match):
        partition(**args)
