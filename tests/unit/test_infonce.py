"""InfoNCE with in-batch negatives against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from resume.retriever.loss import info_nce

KEYS = {
    "retriever/train/loss",
    "retriever/train/accuracy",
    "retriever/train/pos_sim",
    "retriever/train/neg_sim",
}


def test_2x2_hand_computed():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    d = torch.tensor([[1.0, 0.0], [0.6, 0.8]])  # cosines: [[1, .6], [0, .8]]
    loss, stats = info_nce(q, d, temperature=0.5)
    # logits [[2, 1.2], [0, 1.6]]: -log softmax of the diagonal
    row0 = math.log(1 + math.exp(-0.8))  # 0.371101
    row1 = math.log(1 + math.exp(-1.6))  # 0.183901
    assert loss.item() == pytest.approx((row0 + row1) / 2, abs=1e-6)
    assert loss.item() == pytest.approx(0.2775007, abs=1e-6)
    assert stats["retriever/train/accuracy"] == 1.0
    assert stats["retriever/train/pos_sim"] == pytest.approx(0.9)  # (1 + .8) / 2
    assert stats["retriever/train/neg_sim"] == pytest.approx(0.3)  # (.6 + 0) / 2
    assert stats["retriever/train/loss"] == pytest.approx(loss.item())


def test_3x3_hand_computed_with_a_misranked_query():
    q = torch.eye(3)
    d = torch.tensor([[0.6, 0.8, 0.0], [0.0, 0.6, 0.8], [0.0, 0.0, 1.0]])
    # cosines S[i, j] = d[j, i]: [[.6, 0, 0], [.8, .6, 0], [0, .8, 1]]; query 1 prefers doc 0 (.8 > .6)
    loss, stats = info_nce(q, d, temperature=1.0)
    rows = [
        -0.6 + math.log(math.exp(0.6) + 2.0),  # 0.740805
        -0.6 + math.log(math.exp(0.8) + math.exp(0.6) + 1.0),  # 1.018925
        -1.0 + math.log(1.0 + math.exp(0.8) + math.exp(1.0)),  # 0.782352
    ]
    assert loss.item() == pytest.approx(sum(rows) / 3, abs=1e-6)
    assert loss.item() == pytest.approx(0.8473607, abs=1e-6)
    assert stats["retriever/train/accuracy"] == pytest.approx(2 / 3)
    assert stats["retriever/train/pos_sim"] == pytest.approx((0.6 + 0.6 + 1.0) / 3)
    assert stats["retriever/train/neg_sim"] == pytest.approx((0.8 + 0.8) / 6)


def test_temperature_sharpens_the_softmax():
    q = d = torch.eye(2)  # positives at cosine 1, negatives at 0: loss = log(1 + exp(-1 / tau))
    losses = []
    for tau in (0.05, 0.5, 1.0, 10.0):
        loss, _ = info_nce(q, d, temperature=tau)
        assert loss.item() == pytest.approx(math.log1p(math.exp(-1.0 / tau)), rel=1e-5, abs=1e-7)
        losses.append(loss.item())
    assert losses == sorted(losses) and losses[-1] == pytest.approx(
        math.log(2), abs=0.05
    )  # tau -> inf: log B
    # a misranked query: a lower temperature punishes it harder
    d_bad = torch.tensor([[0.6, 0.8], [1.0, 0.0]])  # cosines [[.6, 1], [.8, 0]]: both queries misranked
    lo, _ = info_nce(torch.eye(2), d_bad, temperature=0.05)
    hi, _ = info_nce(torch.eye(2), d_bad, temperature=1.0)
    assert lo.item() > hi.item()


def test_extra_negatives_are_shared_columns():
    torch.manual_seed(0)
    q = F.normalize(torch.randn(3, 8), dim=-1)
    d = F.normalize(torch.randn(3 + 4, 8), dim=-1)  # 3 positives + 4 shared negatives
    loss, stats = info_nce(q, d, temperature=0.1)
    logits = q @ d.T / 0.1
    assert logits.shape == (3, 7)
    expected = -(logits.log_softmax(dim=1)[torch.arange(3), torch.arange(3)]).mean()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    # negatives: 3*7 cosines minus the 3 positives
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[torch.arange(3), torch.arange(3)] = False
    assert stats["retriever/train/neg_sim"] == pytest.approx((q @ d.T)[mask].mean().item(), abs=1e-6)
    # an extra negative identical to a query's positive can only raise that query's loss
    more, _ = info_nce(q, torch.cat([d[:3], d[:1]]), temperature=0.1)
    base, _ = info_nce(q, d[:3], temperature=0.1)
    assert more.item() > base.item()


def test_gradients_flow_to_both_sides():
    q = F.normalize(torch.randn(4, 6), dim=-1).requires_grad_()
    d = F.normalize(torch.randn(4, 6), dim=-1).requires_grad_()
    loss, _ = info_nce(q, d, temperature=0.05)
    loss.backward()
    assert q.grad is not None and d.grad is not None and q.grad.abs().sum() > 0 and d.grad.abs().sum() > 0


def test_stats_keys_and_prefix():
    q = d = torch.eye(2)
    _, stats = info_nce(q, d, temperature=0.05)
    assert set(stats) == KEYS and all(isinstance(v, float) for v in stats.values())
    _, stats = info_nce(q, d, temperature=0.05, prefix="x/")
    assert set(stats) == {k.replace("retriever/train/", "x/") for k in KEYS}


def test_single_pair_without_negatives():
    loss, stats = info_nce(torch.eye(1, 3), torch.eye(1, 3), temperature=0.05)
    assert loss.item() == pytest.approx(0.0, abs=1e-7)  # one logit: nothing to contrast
    assert stats["retriever/train/accuracy"] == 1.0 and math.isnan(stats["retriever/train/neg_sim"])


@pytest.mark.parametrize(
    ("q", "d", "tau", "match"),
    [
        (torch.eye(3), torch.eye(2, 3), 0.05, "one positive document per query"),
        (torch.eye(2), torch.eye(2, 3), 0.05, "expects q"),
        (torch.eye(2), torch.eye(2), 0.0, "temperature"),
    ],
)
def test_rejects_bad_inputs(q, d, tau, match):
    with pytest.raises(ValueError, match=match):
        info_nce(q, d, temperature=tau)


def test_positive_offset_points_each_query_at_its_row_of_gathered_documents():
    """Documents gathered from several devices: this device's positives start at the offset."""
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(2, 8, generator=g), dim=-1)
    d = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    loss, stats = info_nce(q, d, 0.1, positive_offset=2, prefix="")
    logits = q @ d.T / 0.1
    want = -(logits[0, 2] - logits[0].logsumexp(0) + logits[1, 3] - logits[1].logsumexp(0)) / 2
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert stats["pos_sim"] == pytest.approx(((q[0] @ d[2] + q[1] @ d[3]) / 2).item(), rel=1e-6)
    with pytest.raises(ValueError, match="one positive document per query"):
        info_nce(q, d, 0.1, positive_offset=4)
