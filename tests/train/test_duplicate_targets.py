"""loss.mask_duplicate_targets: true gives the loss the target ids (a repeated target is masked as
a false negative for its query); false gives none, so duplicates stay negatives (LLaVE). Values
and gradients against the fp64 reference, on a batch with repeated targets. The fused loss
accumulates in fp32 whatever the input dtype (logits reach +-50 at tau 0.02), so agreement is to
fp32 rounding: 1e-5 relative on the loss, 1e-4 of the largest gradient entry."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hardneg import hardneg_loss_reference
from hardneg.train.config import LossConfig
from hardneg.train.step import batch_loss

B, M, D = 7, 2, 19


def _inputs():
    g = torch.Generator().manual_seed(3)
    t = F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=-1)
    t[4] = t[0]  # the same target twice (classification subsets repeat class names)
    t[6] = t[2]
    # Queries near their targets, as after some training: a duplicate of the positive is then
    # the hardest candidate, weighted exp(alpha * cos) by LLaVE.
    noise = torch.randn(B, D, generator=g, dtype=torch.float64)
    q = F.normalize(t + 0.3 * noise, dim=-1)
    h = F.normalize(torch.randn(B * M, D, generator=g, dtype=torch.float64), dim=-1)
    ids = {
        "target_ids": torch.tensor([0, 1, 2, 3, 0, 5, 2]),
        "hard_negative_ids": torch.arange(100, 100 + B * M).view(B, M),
    }
    return q, t, h, ids


def _value_and_grads(fn, q, t, h):
    q, t, h = (x.clone().requires_grad_(True) for x in (q, t, h))
    loss = fn(q, t, h)
    loss.backward()
    return loss.detach(), [x.grad for x in (q, t, h)]


@pytest.mark.parametrize("mask", [True, False])
def test_mask_duplicate_targets(mask):
    q, t, h, ids = _inputs()
    cfg = LossConfig(mask_duplicate_targets=mask)
    common = dict(
        mode=cfg.mode, temperature=cfg.temperature, alpha=cfg.alpha, symmetric=cfg.symmetric
    )

    def ours(q, t, h):  # the fused loss computes in fp32 (it refuses fp64)
        embs = {"query": q.float(), "target": t.float(), "hard_negatives": h.float()}
        return batch_loss(embs, ids, cfg, None)

    def reference(q, t, h, with_ids):
        return hardneg_loss_reference(
            q,
            t,
            hard_negatives=h.view(B, M, D),
            target_ids=ids["target_ids"] if with_ids else None,
            hard_negative_ids=ids["hard_negative_ids"] if with_ids else None,
            **common,
        )

    got, got_grads = _value_and_grads(ours, q, t, h)
    ref, ref_grads = _value_and_grads(lambda *x: reference(*x, mask), q, t, h)
    other, _ = _value_and_grads(lambda *x: reference(*x, not mask), q, t, h)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=0)
    for a, b in zip(got_grads, ref_grads, strict=True):
        scale = b.abs().max()
        torch.testing.assert_close(a.double() / scale, b / scale, rtol=0, atol=1e-4)
    # The switch matters on this batch: the other setting is a different loss.
    assert abs(float(got - other)) > 1e-3 * abs(float(ref))
