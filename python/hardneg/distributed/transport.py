"""Point-to-point transports of the ring (design section 3): one small interface, two backends.

A transport moves a few tensors to one peer and receives a few from another, asynchronously:
`exchange(dst, sends, src, recvs)` posts every send and receive at once and returns a handle whose
`wait()` orders later work after the transfer. On CUDA, wait() makes the current stream wait (no
host synchronisation); on CPU (gloo) it blocks until the bytes have arrived, while gloo's own
threads move them in the background of the caller's GEMM.

- TorchTransport: torch.distributed.batch_isend_irecv over any process group (gloo on CPU, NCCL on
  GPU). The reference transport: it is what the CPU tests exercise.
- NcclTransport: hardneg's own NCCL communicator (csrc/cuda/nccl_comm.cpp): grouped ncclSend /
  ncclRecv on a dedicated comm stream, ordered against the compute stream by CUDA events. Built
  when nccl.h was found at install time (hardneg.build_info()["nccl"]).

Every rank of the group must call exchange() in the same order with matching sizes: the ring's
schedule guarantees that, and the receive buffers' sizes come from the sizes exchanged up front.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from typing import Protocol

import torch
import torch.distributed as dist
from torch import Tensor

TRANSPORTS = ("auto", "torch", "nccl")


class Handle(Protocol):
    def wait(self) -> None:
        """Orders the caller's later work after the exchange (see the module docstring)."""


class Transport(Protocol):
    rank: int
    world_size: int

    def exchange(
        self, dst: int, sends: Sequence[Tensor], src: int, recvs: Sequence[Tensor]
    ) -> Handle:
        """Sends `sends` to group rank dst and receives `recvs` (preallocated, contiguous) from
        group rank src, in one asynchronous group."""


class _Done:
    def wait(self) -> None:
        return None


class _TorchHandle:
    def __init__(self, works: list, keep: tuple) -> None:
        self._works = works
        self._keep = keep  # the tensors in flight stay alive until wait()

    def wait(self) -> None:
        for w in self._works:
            w.wait()
        self._works = []
        self._keep = ()


class TorchTransport:
    """torch.distributed batch_isend_irecv over `group` (gloo or NCCL)."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        # P2POp takes global ranks (its group_peer argument is recent).
        self._global = dist.get_process_group_ranks(group)

    def exchange(
        self, dst: int, sends: Sequence[Tensor], src: int, recvs: Sequence[Tensor]
    ) -> Handle:
        # A distinct tag per slot keeps gloo from pairing a send with the wrong receive; NCCL
        # ignores tags and matches in issue order, which the slot order also fixes.
        g_dst, g_src = self._global[dst], self._global[src]
        ops = [dist.P2POp(dist.isend, t, g_dst, self.group, tag=i) for i, t in enumerate(sends)]
        ops += [dist.P2POp(dist.irecv, t, g_src, self.group, tag=i) for i, t in enumerate(recvs)]
        if not ops:
            return _Done()
        return _TorchHandle(dist.batch_isend_irecv(ops), (tuple(sends), tuple(recvs)))


# ---------------------------------------------------------------------------------------------
# hardneg's NCCL communicator
# ---------------------------------------------------------------------------------------------

_NCCL_COMMS: dict[str, object] = {}


def _nccl_loaded() -> bool:
    try:
        with open("/proc/self/maps") as f:
            return any("libnccl.so" in line for line in f)
    except OSError:
        return False


def nccl_module():
    """hardneg._C_cuda with libnccl.so.2 loadable. The extension opens NCCL by its soname, which
    finds the copy torch already loaded (CUDA torch loads it from the nvidia-nccl wheel). When
    none is loaded yet (CPU torch, or before torch touched NCCL), the nvidia-nccl-cu12/-cu13 wheel's
    copy is loaded first, globally, so the soname lookup resolves to it rather than failing."""
    from hardneg._ops import _cuda_module

    if not _nccl_loaded():
        try:
            import nvidia.nccl as wheel

            lib = os.path.join(list(wheel.__path__)[0], "lib", "libnccl.so.2")
            if os.path.exists(lib):
                ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
        except ImportError:
            pass  # the system's libnccl.so.2 (ld.so.conf / LD_LIBRARY_PATH), if any
    return _cuda_module()


def nccl_available() -> bool:
    """True when hardneg was built with its NCCL communicator and a CUDA device is present."""
    from hardneg._ops import build_info

    return build_info()["nccl"] and torch.cuda.is_available()


def _cpu_group_for(group: dist.ProcessGroup) -> dist.ProcessGroup:
    """A gloo group over the ranks of `group` to broadcast the ncclUniqueId on. Creating it is a
    collective over the default group (torch.distributed.new_group's rule), done once per group."""
    if dist.get_backend(group) == "gloo":
        return group
    ranks = dist.get_process_group_ranks(group)
    return dist.new_group(ranks, backend="gloo")


class _NcclHandle:
    def __init__(self, comm, slot: int, keep: tuple) -> None:
        self._comm = comm
        self._slot = slot
        self._keep = keep

    def wait(self) -> None:
        if self._comm is not None:
            self._comm.wait(self._slot, torch.cuda.current_stream().cuda_stream)
            self._comm = None


class NcclTransport:
    """hardneg's NCCL communicator (one per process group, created on first use and kept for the
    life of the process; the C++ object destroys its ncclComm_t, stream and events when freed)."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        key = group.group_name
        comm = _NCCL_COMMS.get(key)
        if comm is None:
            cuda = nccl_module()
            cpu_group = _cpu_group_for(group)
            uid = [cuda.nccl_unique_id() if self.rank == 0 else b""]
            src = dist.get_global_rank(cpu_group, 0)
            dist.broadcast_object_list(uid, src=src, group=cpu_group, device=torch.device("cpu"))
            comm = cuda.NcclComm(uid[0], self.world_size, self.rank, torch.cuda.current_device())
            _NCCL_COMMS[key] = comm
        self._comm = comm

    def exchange(
        self, dst: int, sends: Sequence[Tensor], src: int, recvs: Sequence[Tensor]
    ) -> Handle:
        stream = torch.cuda.current_stream().cuda_stream
        slot = self._comm.exchange(
            [(t.data_ptr(), t.numel() * t.element_size()) for t in sends],
            dst,
            [(t.data_ptr(), t.numel() * t.element_size()) for t in recvs],
            src,
            stream,
        )
        # The caching allocator may hand these blocks to the compute stream once Python drops them;
        # the handle keeps them alive until the compute stream has been made to wait.
        return _NcclHandle(self._comm, slot, (tuple(sends), tuple(recvs)))


def make_transport(group: dist.ProcessGroup, device: torch.device, kind: str = "auto") -> Transport:
    """The transport for tensors on `device`: "torch", "nccl", or "auto" (hardneg's NCCL
    communicator for CUDA tensors when it was built, torch.distributed otherwise)."""
    if kind not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {kind!r}")
    if kind == "auto":
        kind = "nccl" if device.type == "cuda" and nccl_available() else "torch"
    if kind == "nccl":
        if device.type != "cuda":
            raise ValueError(f"transport 'nccl' needs CUDA tensors, got tensors on {device}")
        return NcclTransport(group)
    return TorchTransport(group)
