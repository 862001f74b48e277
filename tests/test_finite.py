"""check_finite's deferred verdict (the CUDA path, hardneg._finite), run on CPU tensors.

On CUDA the scan must not synchronise the host: flags are queued with an event and read once the
event has completed. `_finite.DEFERRED_ON_CPU` runs that logic on CPU (there the "event" is
complete at once), so these tests check the queue, the names and the timing of the error; a GPU
test checks that a call makes no host synchronisation.
"""

from __future__ import annotations

import pytest
import torch
from hardneg import _finite, fused_hardneg_loss, raise_if_nonfinite


@pytest.fixture
def deferred(monkeypatch):
    monkeypatch.setattr(_finite, "DEFERRED_ON_CPU", True)
    _finite._PENDING.clear()
    yield
    _finite._PENDING.clear()


def _inputs(bad: str | None = None):
    """Seeded, positive entries: an Inf in any input makes every logit it touches +Inf, so the
    loss is NaN whatever the draw (with signed entries an Inf can land only on -Inf logits, which
    the softmax drops, and the loss stays finite)."""
    g = torch.Generator().manual_seed(0)
    q, t = torch.rand(6, 8, generator=g), torch.rand(6, 8, generator=g)
    h = torch.rand(6, 2, 8, generator=g)
    named = {"query": q, "target": t, "hard_negatives": h}
    if bad:
        named[bad].view(-1)[3] = float("inf")
    return named


@pytest.mark.parametrize("bad", ["query", "target", "hard_negatives"])
def test_the_call_returns_and_the_next_call_raises_naming_the_input(deferred, bad):
    x = _inputs(bad)
    loss = fused_hardneg_loss(x["query"], x["target"], hard_negatives=x["hard_negatives"])
    assert not torch.isfinite(loss)  # the call itself returns: nothing waited on the scan
    y = _inputs()
    with pytest.raises(FloatingPointError, match=f"{bad} held NaN or Inf value.* 1 call"):
        fused_hardneg_loss(y["query"], y["target"], hard_negatives=y["hard_negatives"])
    # Reported once: the queue is cleared, the next call is clean.
    fused_hardneg_loss(y["query"], y["target"], hard_negatives=y["hard_negatives"])


def test_raise_if_nonfinite_is_the_explicit_sync_point(deferred):
    x = _inputs("target")
    fused_hardneg_loss(x["query"], x["target"])
    with pytest.raises(FloatingPointError, match="target held NaN or Inf value.* this call"):
        raise_if_nonfinite()
    raise_if_nonfinite()  # nothing pending any more


def test_finite_inputs_queue_and_clear_without_error(deferred):
    for _ in range(3):
        x = _inputs()
        fused_hardneg_loss(x["query"], x["target"], hard_negatives=x["hard_negatives"])
    raise_if_nonfinite()
    assert not _finite._PENDING


def test_a_verdict_the_device_has_not_reached_waits(deferred):
    """An entry whose event is not complete stays queued (no wait), and so do those after it."""

    class NotYet:
        done = False

        def query(self):
            return self.done

        def synchronize(self):
            self.done = True

    flags = torch.tensor([True])
    _finite._PENDING.append(_finite._Pending(("query",), flags, NotYet(), _finite._CALLS))
    _finite.check_finite({"query": torch.ones(2)})  # collects nothing: the event is pending
    assert len(_finite._PENDING) == 2
    with pytest.raises(FloatingPointError, match="query held"):
        raise_if_nonfinite()


def test_cpu_default_raises_in_the_same_call():
    x = _inputs("query")
    with pytest.raises(FloatingPointError, match="query holds 1 NaN or Inf"):
        fused_hardneg_loss(x["query"], x["target"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_call_makes_no_host_sync():
    """torch.cuda.set_sync_debug_mode("error") raises on any synchronising CUDA call."""
    q = torch.nn.functional.normalize(torch.randn(64, 32, device="cuda"), dim=-1)
    fused_hardneg_loss(q, q)  # warm-up: loads the module, probes, allocates
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fused_hardneg_loss(q, q.roll(1, 0))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    raise_if_nonfinite()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_captures_and_replays_the_loss(dtype):
    """The single-GPU loss (forward and its fused gradient) captured in a CUDA graph replays to the
    eager values on new inputs copied into the captured buffers."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(96, 64, device="cuda", generator=g), dim=-1)
    t = torch.nn.functional.normalize(q + torch.randn(96, 64, device="cuda", generator=g), dim=-1)
    q, t = q.to(dtype).requires_grad_(), t.to(dtype).requires_grad_()

    def step():
        q.grad = t.grad = None
        loss = fused_hardneg_loss(q, t, mode="llave", symmetric=True)
        loss.backward()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up outside the capture: module load, GEMM probes, pools
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    new_q = torch.nn.functional.normalize(torch.randn_like(q, dtype=torch.float32), dim=-1)
    with torch.no_grad():
        q.copy_(new_q.to(dtype))
    graph.replay()
    torch.cuda.synchronize()
    got_loss, got_dq = captured.detach().clone(), q.grad.detach().clone()
    eager = step()
    torch.testing.assert_close(got_loss, eager.detach())
    torch.testing.assert_close(got_dq, q.grad)
