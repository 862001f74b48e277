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
Every handle is waited before the ring returns: nothing is left in flight between calls.

The NCCL communicator's life (one per process group and device, _CommRegistry):
- created on first use by the ranks of the group only: group rank 0's ncclUniqueId is broadcast
  over the group itself (torch.distributed.new_group would be a collective of the whole world,
  which hangs when the group is a proper subgroup);
- made for the tensors' device, whichever device is current, and ordered against that device's
  current stream;
- ended when its group is destroyed (the next use of any communicator finds it unregistered) or
  freed, and at exit by an atexit hook while the interpreter is whole, without waiting on peers
  that may be gone; release_comms() destroys them gracefully. A re-created default group (same
  name, new group) gets a new communicator.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import threading
import warnings
import weakref
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


def _registered(group: dist.ProcessGroup) -> bool:
    """False once destroy_process_group has removed `group` from torch's registry."""
    try:
        dist.get_backend(group)
    except (ValueError, RuntimeError, KeyError):
        return False
    return True


def _close(comm, wait: bool) -> None:
    """Ends a communicator while the interpreter is alive. wait=True (release_comms): its
    destroy(), which waits at most the communicator's timeout for queued transfers and aborts it
    when they do not finish. wait=False (its group destroyed or freed; interpreter exit): no call,
    as peers may be gone; the caller drops the last reference and the C++ destructor destroys an
    idle healthy communicator and aborts any other, never waiting."""
    destroy = getattr(comm, "destroy", None)
    if not wait or destroy is None:
        return
    try:
        destroy()
    except RuntimeError as err:  # it was aborted (destroy() aborts before raising)
        abort = getattr(comm, "abort", None)
        if abort is not None:
            abort()
        warnings.warn(f"hardneg: {err}", stacklevel=3)


def _close_all(comms: dict, wait: bool = False) -> None:
    for comm in comms.values():
        _close(comm, wait)
    comms.clear()


class _CommRegistry:
    """hardneg's NCCL communicators, one per (process group, device), living no longer than
    their group: an entry goes when the group object is freed (weak key), when a later lookup
    finds the group destroyed (destroy_process_group unregisters it; a re-created default group is
    another object and gets a new communicator), on release(), and at interpreter exit (atexit,
    while the interpreter is still whole, never from a finaliser during its teardown). Only
    release_comms() waits for queued transfers (see _close)."""

    def __init__(self) -> None:
        self._comms: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def get(self, group: dist.ProcessGroup, device: torch.device, create):
        """The communicator of (group, device), made by create() on first use."""
        self.prune()
        with self._lock:
            comms = self._comms.get(group)
            if comms is None:
                comms = self._comms[group] = {}
                weakref.finalize(group, _close_all, comms).atexit = False
            comm = comms.get(device.index)
        if comm is None:
            comm = create()  # collective over `group`: outside the lock
            with self._lock:
                comms[device.index] = comm
        return comm

    def prune(self) -> None:
        """Closes the communicators of every group that has been destroyed."""
        with self._lock:
            dead = [g for g in list(self._comms.keys()) if not _registered(g)]
            closing = [self._comms.pop(g) for g in dead]
        for comms in closing:
            _close_all(comms)

    def release(self, group: dist.ProcessGroup | None = None, wait: bool = False) -> None:
        """Closes the communicators of `group`, or of every group (see _close for `wait`)."""
        with self._lock:
            groups = list(self._comms.keys()) if group is None else [group]
            closing = [self._comms.pop(g) for g in groups if g in self._comms]
        for comms in closing:
            _close_all(comms, wait)


_COMMS = _CommRegistry()
atexit.register(_COMMS.release)


def release_comms(group: dist.ProcessGroup | None = None) -> None:
    """Destroys hardneg's NCCL communicators of `group` (all of them when None) now, waiting at
    most their timeout for queued transfers. Optional: they also end with their process group
    and at interpreter exit, there without waiting (peers may be gone)."""
    _COMMS.release(group, wait=True)


def _bootstrap_device(group: dist.ProcessGroup, device: torch.device) -> torch.device:
    """Where the ncclUniqueId is broadcast over `group` itself: the CPU when the group's backend
    serves CPU tensors (gloo, or a "cpu:gloo,cuda:nccl" group), else the tensors' device."""
    backend = str(dist.get_backend(group))
    if ":" in backend:
        serves_cpu = any(part.split(":")[0] == "cpu" for part in backend.split(","))
    else:
        serves_cpu = "cpu" in dist.Backend.backend_capability.get(backend, ())
    return torch.device("cpu") if serves_cpu else device


def _new_comm(group: dist.ProcessGroup, device: torch.device):
    """A communicator over the ranks of `group` on `device`. Only the ranks of `group` take part:
    the ncclUniqueId of group rank 0 is broadcast over `group` itself (no new process group,
    whose creation would be a collective over the whole world)."""
    cuda = nccl_module()
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    uid = [cuda.nccl_unique_id() if rank == 0 else b""]
    dist.broadcast_object_list(
        uid, group_src=0, group=group, device=_bootstrap_device(group, device)
    )
    return cuda.NcclComm(uid[0], size, rank, device.index)


def _cuda_device(device) -> torch.device:
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"transport 'nccl' needs CUDA tensors, got tensors on {device}")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _check_device(tensors: Sequence[Tensor], name: str, device: torch.device) -> None:
    for i, t in enumerate(tensors):
        if t.device != device:
            raise ValueError(
                f"{name}[{i}] is on {t.device} but this NCCL transport serves {device}"
            )


class _NcclHandle:
    def __init__(self, comm, slot: int, device: torch.device, keep: tuple) -> None:
        self._comm = comm
        self._slot = slot
        self._device = device
        self._keep = keep

    def wait(self) -> None:
        if self._comm is not None:
            self._comm.wait(self._slot, torch.cuda.current_stream(self._device).cuda_stream)
            self._comm = None
            self._keep = ()


class NcclTransport:
    """hardneg's NCCL communicator for tensors on `device` (CUDA): the communicator, its stream
    and its events live on that device, whichever device is current, and each exchange is
    ordered against that device's current stream. One communicator per (group, device), shared
    by every transport of that pair and closed with its group (see _CommRegistry)."""

    def __init__(self, group: dist.ProcessGroup, device) -> None:
        self.device = _cuda_device(device)
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self._comm = _COMMS.get(group, self.device, lambda: _new_comm(group, self.device))

    def exchange(
        self, dst: int, sends: Sequence[Tensor], src: int, recvs: Sequence[Tensor]
    ) -> Handle:
        _check_device(sends, "sends", self.device)
        _check_device(recvs, "recvs", self.device)
        stream = torch.cuda.current_stream(self.device).cuda_stream
        slot = self._comm.exchange(
            [(t.data_ptr(), t.numel() * t.element_size()) for t in sends],
            dst,
            [(t.data_ptr(), t.numel() * t.element_size()) for t in recvs],
            src,
            stream,
        )
        # The caching allocator may hand these blocks to the compute stream once Python drops them;
        # the handle keeps them alive until the compute stream has been made to wait.
        return _NcclHandle(self._comm, slot, self.device, (tuple(sends), tuple(recvs)))


def make_transport(group: dist.ProcessGroup, device: torch.device, kind: str = "auto") -> Transport:
    """The transport for tensors on `device`: "torch", "nccl", or "auto" (hardneg's NCCL
    communicator for CUDA tensors when it was built, torch.distributed otherwise)."""
    if kind not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {kind!r}")
    if kind == "auto":
        kind = "nccl" if device.type == "cuda" and nccl_available() else "torch"
    if kind == "nccl":
        return NcclTransport(group, device)
    return TorchTransport(group)
