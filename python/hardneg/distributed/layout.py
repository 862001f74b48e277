"""Who holds what in the cross-device loss: every rank's block sizes, the checks that the ranks
agree, this rank's own block, and the few collectives outside the ring schedule.

A block is the (N_k + S_k, D) matrix [T_k; H_k; Q_k] of rank k with ids [t_ids_k; h_ids_k]:
N_k = B_k (1 + M_k) candidates (targets, then hard negatives), S_k = B_k query rows when symmetric
(the t->q direction's columns), 0 otherwise. Every rank computes the same Layout from one
all-gather of (B_k, M_k) per rank, done once per call before any loop.

Custom ops take no process group argument: they carry the group's name (register_group) and look
the group up here.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from hardneg._constants import MODES, REDUCTIONS
from hardneg._schedule import candidate_ids
from hardneg._spec import FLOAT_DTYPES, LossSpec

# Weak values: a process group must die with destroy_process_group. Kept alive here, a gloo
# group's worker threads outlive it into interpreter teardown, where one still releasing a
# finished work's tensors must take the GIL, is made to exit instead, and the forced unwind aborts
# the process ("terminate called without an active exception").
_GROUPS: weakref.WeakValueDictionary[str, dist.ProcessGroup] = weakref.WeakValueDictionary()


def register_group(group: dist.ProcessGroup) -> str:
    """The name an op carries for `group` (see lookup_group)."""
    name = group.group_name
    _GROUPS[name] = group
    return name


def lookup_group(name: str) -> dist.ProcessGroup:
    return _GROUPS[name]


@dataclass(frozen=True)
class Layout:
    """Block sizes of every rank, identical on all ranks."""

    rank: int
    batch: tuple[int, ...]  # B_k
    hard_negatives: tuple[int, ...]  # M_k
    symmetric: bool

    @classmethod
    def from_sizes(cls, sizes, rank: int, symmetric: bool) -> Layout:
        """From [B_0, M_0, B_1, M_1, ...] (exchange_sizes)."""
        return cls(rank, tuple(sizes[0::2]), tuple(sizes[1::2]), symmetric)

    @property
    def world_size(self) -> int:
        return len(self.batch)

    def cands(self, k: int) -> int:  # N_k
        return self.batch[k] * (1 + self.hard_negatives[k])

    def block_rows(self, k: int) -> int:  # N_k + S_k
        return self.cands(k) + (self.batch[k] if self.symmetric else 0)

    @property
    def max_block_rows(self) -> int:
        return max(self.block_rows(k) for k in range(self.world_size))

    @property
    def max_cands(self) -> int:
        return max(self.cands(k) for k in range(self.world_size))

    @property
    def total_batch(self) -> int:
        return sum(self.batch)

    def owner(self, step: int) -> int:
        """Owner of the block rank `rank` holds at ring step `step`."""
        return (self.rank - step) % self.world_size


# What every rank must agree on, in the order exchange_sizes sends it after (B, M).
_AGREED = (
    "D",
    "dtype",
    "target_ids given",
    "mode",
    "symmetric",
    "reduction",
    "temperature",
    "alpha",
    "ega_beta",
    "ega_margin",
)


def exchange_sizes(
    group: dist.ProcessGroup,
    query: Tensor,
    hard_negatives: Tensor | None,
    target_ids: Tensor | None,
    spec: LossSpec,
) -> list[int]:
    """All-gathers every rank's (B, M) and checks that the ranks agree on D, dtype, ids and the
    loss options (a mismatch would silently compute a different loss per rank). Returns
    [B_0, M_0, B_1, M_1, ...]. One host synchronisation, before any loop."""
    B, D = query.shape
    M = hard_negatives.shape[1] if hard_negatives is not None else 0
    mine = [
        B,
        M,
        D,
        FLOAT_DTYPES.index(query.dtype),
        target_ids is not None,
        spec.mode_code,
        spec.symmetric,
        REDUCTIONS.index(spec.reduction),
        spec.temperature,
        spec.alpha,
        spec.ega_beta,
        spec.ega_margin,
    ]
    K = dist.get_world_size(group)
    meta = torch.tensor(mine, dtype=torch.float64, device=query.device)
    gathered = torch.empty(K, len(mine), dtype=torch.float64, device=query.device)
    all_gather_single(gathered.view(-1), meta, group)
    rows = gathered.cpu().tolist()
    rank = dist.get_rank(group)
    for k, row in enumerate(rows):
        for name, theirs, ours in zip(_AGREED, row[2:], rows[rank][2:], strict=True):
            if theirs != ours:
                raise ValueError(
                    f"rank {k} of the group passes {name} = {_describe(name, theirs)} but rank "
                    f"{rank} passes {_describe(name, ours)}: every rank must agree"
                )
    return [int(v) for row in rows for v in row[:2]]


def _describe(name: str, value: float):
    if name == "dtype":
        return FLOAT_DTYPES[int(value)]
    if name == "mode":
        return MODES[int(value)]
    if name == "reduction":
        return REDUCTIONS[int(value)]
    return value


def all_gather_single(out: Tensor, inp: Tensor, group) -> None:
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, inp, group=group)


def reduce_scatter_single(out: Tensor, inp: Tensor, group) -> None:
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, inp, group=group)


def own_block(query, target, hard_negatives, target_ids, hard_negative_ids, symmetric):
    """This rank's block [T; H; Q] (input dtype) and its ids [t_ids; h_ids] (None without ids)."""
    D = query.shape[1]
    parts = [target]
    if hard_negatives is not None:
        parts.append(hard_negatives.reshape(-1, D))
    if symmetric:
        parts.append(query)
    emb = torch.cat(parts).contiguous()
    return emb, candidate_ids(target_ids, hard_negative_ids, hard_negatives)


def finish_loss(loss_B: Tensor, reduction: str, layout: Layout, group) -> Tensor:
    """The global reduced loss on every rank (one all-reduce of a scalar), or the local slice."""
    if reduction == "none":
        return loss_B
    total = loss_B.sum().reshape(1)
    dist.all_reduce(total, group=group)
    return total[0] / layout.total_batch if reduction == "mean" else total[0]
