"""GradCache on the tiny Embedder (fp64, attention dropout on) against one big batch.

The ground truth makes the same forward calls in the same order (so dropout draws the same masks)
but keeps every chunk in one autograd graph and back-propagates the loss through it. The Embedder
returns fp32 embeddings (its contract), so both paths pass through the same fp32 rounding of the
embeddings: gradients agree to fp32 precision of the loss input (rtol 1e-5), not to fp64.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from hardneg import hardneg_loss_reference
from hardneg.data.collate import split_rows
from hardneg.models import Embedder
from hardneg.train import gradcache
from hardneg.train.gradcache import gradcache_step
from PIL import Image

DROPOUT = 0.2


def _tiny_with_dropout() -> Embedder:
    embedder = Embedder.tiny(seed=0).double().train()
    n = 0
    for module in embedder.modules():
        # Qwen2 and SigLIP attention read their dropout probability from this attribute.
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = DROPOUT
            n += 1
        elif type(module).__name__ == "SiglipAttention":
            module.dropout = DROPOUT
            n += 1
    assert n > 0
    return embedder


def _items(n: int):
    queries, targets = [], []
    for i in range(n):
        colour = ((37 * i) % 256, (91 * i) % 256, (53 * i + 40) % 256)
        targets.append(
            {"text": "Represent the given image.", "image": Image.new("RGB", (32, 32), colour)}
        )
        queries.append({"text": f"a shape of colour number {i} on the left", "image": None})
    return queries, targets


def _loss(embs):
    return hardneg_loss_reference(embs["query"], embs["target"], mode="llave", symmetric=True)


def _streams(embedder, queries, targets, chunk):
    return {
        "query": [
            embedder.prepare(queries[s], role="query") for s in split_rows(len(queries), chunk)
        ],
        "target": [
            embedder.prepare(targets[s], role="target") for s in split_rows(len(targets), chunk)
        ],
    }


def _grads(embedder):
    return {n: p.grad.clone() for n, p in embedder.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def setup():
    embedder = _tiny_with_dropout()
    queries, targets = _items(7)
    streams = _streams(embedder, queries, targets, chunk=3)
    embedder.zero_grad()
    torch.manual_seed(11)
    embs = {name: torch.cat([embedder(**x) for x in chunks]) for name, chunks in streams.items()}
    _loss(embs).backward()
    return embedder, streams, _grads(embedder)


def _run_gradcache(embedder, streams):
    embedder.zero_grad()
    torch.manual_seed(11)
    gradcache_step(lambda x: embedder(**x), streams, _loss)
    return _grads(embedder)


def test_gradcache_matches_big_batch_with_dropout(setup):
    embedder, streams, ref = setup
    got = _run_gradcache(embedder, streams)
    assert set(got) == set(ref) and len(ref) > 10
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-8, msg=name)


def test_dropout_is_active_and_replay_matters(setup, monkeypatch):
    """Without restoring the RNG per chunk the gradients differ: the check can fail."""
    embedder, streams, ref = setup
    monkeypatch.setattr(gradcache.RngState, "restored", lambda self: contextlib.nullcontext())
    got = _run_gradcache(embedder, streams)
    worst = max(
        ((got[n] - ref[n]).abs().max() / ref[n].abs().max().clamp_min(1e-12)).item() for n in ref
    )
    assert worst > 1e-3
