"""GradCache: contrastive steps whose batch is far larger than the activations that fit.

The loss couples every row of the batch, so it cannot be accumulated chunk by chunk; its input, the
B x D embeddings, is tiny. GradCache (Gao et al., 2021, "Scaling Deep Contrastive Learning Batch
Size under Memory Limited Setup") therefore splits the step in three:

  1. embed: every chunk of every stream (queries, targets, hard negatives) runs forward under
     no_grad; the CPU and CUDA RNG states are saved before each chunk, the embeddings are kept
     (B x D).
  2. loss: the loss runs on the cached embeddings (leaf tensors), and its backward gives
     dL/d(embedding) for every row; nothing of the model is in that graph.
  3. replay: each chunk runs forward again with grad under its saved RNG state (dropout draws the
     same masks, so the replayed embedding equals the cached one) and is back-propagated with
     its slice of dL/d(embedding): sum_i <e_i, g_i>.backward() adds exactly the chunk's share of
     dL/dparams. Peak activation memory is one chunk's, whatever B is. The last chunk of pass 1
     ran with grad and kept its graph, so it is back-propagated first and not replayed.

Engines. Parameter gradients must be reduced once per step, on the last replayed chunk: DDP runs
the other chunks under no_sync(); DeepSpeed is told the accumulation boundary with
engine.set_gradient_accumulation_boundary(is_last) before each chunk's backward (its ZeRO-2/3
hooks then reduce only at the boundary). Every rank must run the same number of forwards, because
ZeRO-3 gathers parameters in every forward and DDP reduces in the last backward: ranks with fewer
chunks pad with "empty work", a repeat of a real chunk whose output is discarded in pass 1 and
back-propagated with a zero gradient in pass 3.

Legend: B rows of a stream on this rank, C rows per chunk, D embedding dim.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor


class RngState:
    """The CPU RNG state and, when CUDA is initialised, every visible device's RNG state."""

    def __init__(self) -> None:
        self.cpu_state = torch.get_rng_state()
        self.cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []

    def restored(self) -> AbstractContextManager:
        """Context in which the RNG starts from this state; the outer state comes back on exit."""
        return _Restored(self)


class _Restored:
    def __init__(self, state: RngState) -> None:
        self.state = state
        devices = list(range(len(state.cuda_states)))
        self.fork = torch.random.fork_rng(devices=devices)

    def __enter__(self):
        self.fork.__enter__()
        torch.set_rng_state(self.state.cpu_state)
        if self.state.cuda_states:
            torch.cuda.set_rng_state_all(self.state.cuda_states)

    def __exit__(self, *exc):
        return self.fork.__exit__(*exc)


@dataclass
class EngineHooks:
    """How one engine reduces gradients. sync(is_last) wraps a chunk's forward and backward
    (DDP: no_sync() unless last; DeepSpeed: sets the accumulation boundary); backward(scalar)
    back-propagates (DeepSpeed: engine.backward)."""

    sync: Callable[[bool], AbstractContextManager] = lambda is_last: nullcontext()
    backward: Callable[[Tensor], None] = lambda scalar: scalar.backward()


def _upcast(emb: Tensor) -> Tensor:
    # The loss runs in fp32 (at tau = 0.02 logits reach +-50, where bf16 steps are 0.25); fp64
    # stays fp64 so that tests can compare at fp64 precision.
    return emb if emb.dtype == torch.float64 else emb.float()


def gradcache_step(
    encode: Callable[[object], Tensor],
    streams: dict[str, Sequence[object]],
    loss_fn: Callable[[dict[str, Tensor]], Tensor],
    *,
    hooks: EngineHooks | None = None,
    num_forwards: dict[str, int] | None = None,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One GradCache step: accumulate d(loss)/d(params) into .grad; returns (loss, embeddings).

    encode(chunk) -> (C, D) embeddings of one chunk of model inputs (any object the encoder
    takes). streams maps a name ("query", "target", "hard_negatives") to its chunks, in row order.
    loss_fn(embeddings) gets {name: (B, D) fp32 leaf tensor} and returns the scalar to
    back-propagate (already scaled for the engine's gradient averaging). num_forwards[name]
    (>= len(chunks)) is the number of forwards every rank runs for that stream: the missing ones
    are padded with empty work. autocast() wraps every model forward (bf16 autocast, say); the
    loss itself runs outside it, in fp32 (fp64 inputs stay fp64). Returns the loss value
    (detached) and the cached embeddings (detached).
    """
    hooks = hooks or EngineHooks()
    num_forwards = num_forwards or {}
    plan: list[tuple[str, int, bool]] = []  # (stream, chunk index, is padding)
    for name, chunks in streams.items():
        if len(chunks) == 0:
            raise ValueError(f"stream {name!r} has no chunks")
        total = num_forwards.get(name, len(chunks))
        if total < len(chunks):
            raise ValueError(
                f"num_forwards[{name!r}] = {total} is below its {len(chunks)} chunks on this rank"
            )
        plan += [(name, i, False) for i in range(len(chunks))]
        plan += [(name, len(chunks) - 1, True) for _ in range(total - len(chunks))]

    # The last chunk of the plan keeps its graph from pass 1 instead of being replayed: nothing
    # runs between its forward and its backward but the (tiny) loss, so peak memory is still one
    # chunk's, and a step costs one forward less. Its engine context (DDP no_sync decides at
    # forward time) spans its forward and its backward.
    keep_last = not plan[-1][2]
    with ExitStack() as kept_sync:
        # 1. Embed every chunk without a graph, remembering the RNG state it started from.
        rng_states: list[RngState] = []
        cached: dict[str, list[Tensor]] = {name: [] for name in streams}
        kept_CD = None
        for k, (name, i, padding) in enumerate(plan):
            rng_states.append(RngState())
            if keep_last and k == len(plan) - 1:
                kept_sync.enter_context(hooks.sync(len(plan) == 1))
                with autocast():
                    kept_CD = _upcast(encode(streams[name][i]))
                cached[name].append(kept_CD.detach())
                continue
            with torch.no_grad(), autocast():
                emb_CD = encode(streams[name][i])
            if not padding:
                cached[name].append(_upcast(emb_CD))

        # 2. Loss on the cached embeddings: its backward stops at the leaves.
        leaves = {
            name: torch.cat(embs).detach().requires_grad_(True) for name, embs in cached.items()
        }
        loss = loss_fn(leaves)
        loss.backward()
        grads = {name: leaf.grad for name, leaf in leaves.items()}
        offsets = {
            name: torch.tensor([0] + [e.shape[0] for e in embs]).cumsum(0).tolist()
            for name, embs in cached.items()
        }

        def grad_of(name: str, i: int, padding: bool) -> Tensor:
            g_CD = grads[name][offsets[name][i] : offsets[name][i + 1]]
            return torch.zeros_like(g_CD) if padding else g_CD

        if kept_CD is not None:
            # <e, g> summed: its gradient w.r.t. the parameters is J_e^T g, the chunk's share.
            hooks.backward((kept_CD * grad_of(*plan[-1])).sum())

    # 3. Replay the other chunks with grad under their saved RNG state, back-propagating their
    # slice of dL/d(embedding); the engine reduces parameter gradients on the last one only.
    replay = plan[:-1] if keep_last else plan
    for k, ((name, i, padding), rng) in enumerate(zip(replay, rng_states, strict=False)):
        is_last = k == len(replay) - 1
        with hooks.sync(is_last), rng.restored():
            with autocast():
                emb_CD = encode(streams[name][i])
            hooks.backward((_upcast(emb_CD) * grad_of(name, i, padding)).sum())
    return loss.detach(), {name: leaf.detach() for name, leaf in leaves.items()}
