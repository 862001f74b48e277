"""GradCache against one big batch on a small dropout MLP (fp64), plus its engine plumbing.

The tiny-Embedder version of this check (transformers model, dropout on) is in
test_gradcache_embedder.py.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from hardneg import fused_hardneg_loss, hardneg_loss_reference
from hardneg.data.collate import split_rows
from hardneg.train import gradcache
from hardneg.train.gradcache import EngineHooks, gradcache_step
from torch import nn


class DropoutEncoder(nn.Module):
    def __init__(self, d_in=13, d_out=11):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_in, 32), nn.Dropout(0.3), nn.GELU(), nn.Linear(32, d_out)
        )

    def forward(self, x):
        return nn.functional.normalize(self.net(x), dim=-1)


def _loss_ref(embs):
    return hardneg_loss_reference(embs["query"], embs["target"], mode="llave", symmetric=True)


def _big_batch_grads(model, q, t, seed):
    model.zero_grad()
    torch.manual_seed(seed)
    # Same order of RNG use as GradCache: all query rows, then all target rows.
    loss = _loss_ref({"query": model(q), "target": model(t)})
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def _cached_grads(model, q, t, seed, chunk, **kw):
    model.zero_grad()
    torch.manual_seed(seed)
    streams = {
        "query": [q[s] for s in split_rows(len(q), chunk)],
        "target": [t[s] for s in split_rows(len(t), chunk)],
    }
    loss, _ = gradcache_step(model, streams, _loss_ref, **kw)
    return loss, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("batch,chunk", [(1, 1), (7, 3), (16, 16), (21, 4)])
def test_gradcache_matches_big_batch_fp64(batch, chunk):
    torch.manual_seed(0)
    model = DropoutEncoder().double().train()
    q, t = torch.randn(batch, 13, dtype=torch.float64), torch.randn(batch, 13, dtype=torch.float64)
    # Dropout masks are drawn per forward call, so the big batch makes the same calls (chunk by
    # chunk, in the same order) but keeps them all in one autograd graph: the ground truth.
    model.zero_grad()
    torch.manual_seed(5)
    embs = {
        name: torch.cat([model(x[s]) for s in split_rows(batch, chunk)])
        for name, x in (("query", q), ("target", t))
    }
    ref_loss = _loss_ref(embs)
    ref_loss.backward()
    ref = [p.grad.clone() for p in model.parameters()]
    loss, got = _cached_grads(model, q, t, seed=5, chunk=chunk)
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-12, atol=1e-12)
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_gradcache_without_rng_replay_is_caught(monkeypatch):
    """The comparison can fail: replaying chunks with fresh dropout masks changes the gradient."""
    torch.manual_seed(0)
    model = DropoutEncoder().double().train()
    q, t = torch.randn(12, 13, dtype=torch.float64), torch.randn(12, 13, dtype=torch.float64)
    _, good = _cached_grads(model, q, t, seed=5, chunk=4)
    monkeypatch.setattr(gradcache.RngState, "restored", lambda self: contextlib.nullcontext())
    _, bad = _cached_grads(model, q, t, seed=5, chunk=4)
    assert max((g - b).abs().max().item() for g, b in zip(good, bad, strict=True)) > 1e-3


def test_gradcache_no_dropout_equals_unchunked_big_batch():
    """Without dropout the chunking is invisible: one forward of the whole batch agrees."""
    torch.manual_seed(1)
    model = DropoutEncoder().double().eval()
    q, t = torch.randn(19, 13, dtype=torch.float64), torch.randn(19, 13, dtype=torch.float64)
    ref_loss, ref = _big_batch_grads(model, q, t, seed=0)
    loss, got = _cached_grads(model, q, t, seed=0, chunk=5)
    torch.testing.assert_close(loss, ref_loss)
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_gradcache_fused_loss_fp32_matches_reference():
    """With the fused op as loss (fp32 accumulation) the parameter gradients match the fp64
    reference to fp32 rounding (loss gradients are O(1/tau) = 50, so atol 1e-4)."""
    torch.manual_seed(2)
    model = DropoutEncoder().double().eval()
    q, t = torch.randn(23, 13, dtype=torch.float64), torch.randn(23, 13, dtype=torch.float64)
    _, ref = _big_batch_grads(model, q, t, seed=0)
    model.zero_grad()
    streams = {
        "query": [q[s] for s in split_rows(23, 6)],
        "target": [t[s] for s in split_rows(23, 6)],
    }

    def fused(embs):  # fp32 embeddings (the fused loss refuses fp64), fp64 model around them
        q, t = embs["query"].float(), embs["target"].float()
        return fused_hardneg_loss(q, t, mode="llave", symmetric=True)

    gradcache_step(model, streams, fused)
    for p, r in zip(model.parameters(), ref, strict=True):
        torch.testing.assert_close(p.grad, r, rtol=1e-4, atol=1e-4)


def test_padding_runs_extra_forwards_with_zero_gradient():
    torch.manual_seed(3)
    model = DropoutEncoder().double().eval()
    q, t = torch.randn(9, 13, dtype=torch.float64), torch.randn(9, 13, dtype=torch.float64)
    _, ref = _cached_grads(model, q, t, seed=0, chunk=4)
    calls = []
    original = model.forward

    def counting(x):
        calls.append(x.shape[0])
        return original(x)

    model.forward = counting
    syncs = []

    @contextlib.contextmanager
    def sync(is_last):
        syncs.append(is_last)
        yield

    _, got = _cached_grads(
        model,
        q,
        t,
        seed=0,
        chunk=4,
        num_forwards={"query": 5, "target": 3},
        hooks=EngineHooks(sync=sync),
    )
    # 5 + 3 forwards in pass 1 (the last one keeps its graph), the other 7 replayed.
    assert len(calls) == 15
    assert syncs == [False] * 7 + [True]
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-14)


def test_bad_arguments_are_named():
    model = DropoutEncoder().double()
    x = torch.randn(4, 13, dtype=torch.float64)
    with pytest.raises(ValueError, match="num_forwards\\['query'\\] = 1"):
        gradcache_step(
            model, {"query": [x, x], "target": [x, x]}, _loss_ref, num_forwards={"query": 1}
        )
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        split_rows(4, 0)
