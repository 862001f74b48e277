"""check_finite without a host synchronisation on CUDA.

On CPU the inputs are scanned in place and a NaN or Inf raises FloatingPointError at once (a CPU
"sync" costs nothing). On CUDA, waiting for a scan's result would stall the host on every call,
stop work from queueing ahead and forbid CUDA-graph capture. Instead each call queues, on the
current stream: one isfinite-all reduction per input into a small flag tensor and a non-blocking
copy of the flags to pinned host memory, then records an event. The verdict is read later, when
the event has completed (event.query(): no wait): at the start of every later hardneg call on
that device, and by `raise_if_nonfinite()` (which waits). So a non-finite input raises
FloatingPointError, naming the input and how many calls ago it was passed, at the next hardneg
call after the GPU has reached it, or at raise_if_nonfinite(); the loss of the call that saw it
is NaN or Inf itself, so nothing is silently trained on meanwhile. Under CUDA-graph capture no
check is queued (the captured graph replays without one): check before capture or pass
check_finite=False.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
from torch import Tensor

# Tests run the deferred (CUDA) logic on CPU tensors with this switch.
DEFERRED_ON_CPU = False


@dataclass
class _Pending:
    names: tuple[str, ...]
    flags: Tensor  # host (pinned on CUDA), one bool per input: True = holds NaN or Inf
    event: object  # torch.cuda.Event, None on CPU
    call: int


_PENDING: deque[_Pending] = deque()
_CALLS = 0


def check_finite(tensors: dict[str, Tensor | None]) -> None:
    """FloatingPointError naming an input that holds a NaN or Inf: now on CPU; on CUDA deferred
    as the module docstring says (earlier calls' verdicts are collected first)."""
    global _CALLS
    _CALLS += 1
    present = {k: t for k, t in tensors.items() if t is not None}
    if not present:
        return
    device = next(iter(present.values())).device
    _collect(wait=False)
    if device.type == "cpu" and not DEFERRED_ON_CPU:
        _scan_now(present)
        return
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return
    flags = torch.stack([~torch.isfinite(t).all() for t in present.values()])
    if device.type == "cuda":
        host = torch.empty(flags.shape, dtype=torch.bool, pin_memory=True)
        host.copy_(flags, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
    else:
        host, event = flags, None
    _PENDING.append(_Pending(tuple(present), host, event, _CALLS))


def raise_if_nonfinite() -> None:
    """Waits for every queued check_finite verdict and raises FloatingPointError for the first
    non-finite input (a synchronisation point; nothing to do on CPU)."""
    _collect(wait=True)


def _collect(*, wait: bool) -> None:
    while _PENDING:
        entry = _PENDING[0]
        if entry.event is not None:
            if wait:
                entry.event.synchronize()
            elif not entry.event.query():
                return  # the GPU has not reached it; later entries are later on the stream
        _PENDING.popleft()
        for name, bad in zip(entry.names, entry.flags.tolist(), strict=True):
            if bad:
                _PENDING.clear()
                ago = _CALLS - entry.call
                when = "this call" if ago == 0 else f"the hardneg call {ago} call(s) ago"
                raise FloatingPointError(
                    f"{name} held NaN or Inf value(s) in {when}; pass check_finite=False to skip "
                    "this check"
                )


def _scan_now(tensors: dict[str, Tensor]) -> None:
    for name, t in tensors.items():
        # One read-only reduction first: a NaN or Inf anywhere makes the sum NaN or Inf. Only then
        # the exact scan, which also clears a sum that overflowed on huge finite values.
        if bool(torch.isfinite(t.sum())):
            continue
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise FloatingPointError(
                f"{name} holds {bad} NaN or Inf value(s); pass check_finite=False to skip this scan"
            )
