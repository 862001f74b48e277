"""A stand-in for hardneg._C_cuda's NCCL communicator, for testing the transport's logic on CPU.

FakeNccl().install(monkeypatch) makes hardneg.distributed.transport build FakeComm objects, which
record what they were created with and every call the transport makes (streams as integers,
buffers as (address, bytes)), instead of touching a GPU. FakeNccl keeps only weak references to
them, so a test sees when the transport lets one go (the C++ object's destructor would run then).
fake_cuda(monkeypatch) simulates a CUDA machine whose current device is 0 and whose current stream
on device d is the integer 1000 + d. FakeTensor is the little of a CUDA tensor the transport reads.
"""

from __future__ import annotations

import os
import sys
import weakref
from dataclasses import dataclass, field

import torch
from hardneg.distributed import transport


@dataclass
class FakeComm:
    unique_id: bytes
    nranks: int
    rank: int
    device: int
    exchanges: list = field(default_factory=list)  # (sends, dst, recvs, src, stream)
    waits: list = field(default_factory=list)  # (slot, stream)
    destroyed: bool = False  # destroy() was called
    report: str = ""  # printed to stdout when the comm is freed, when set

    def exchange(self, sends, dst, recvs, src, stream) -> int:
        self.exchanges.append((sends, dst, recvs, src, stream))
        return len(self.exchanges) % 2

    def wait(self, slot, stream) -> None:
        self.waits.append((slot, stream))

    def destroy(self) -> None:
        self.destroyed = True

    def __del__(self) -> None:
        if self.report:
            text = f"{self.report} destroyed={self.destroyed} finalizing={sys.is_finalizing()}\n"
            os.write(1, text.encode())


class FakeNccl:
    """The module hardneg.distributed.transport.nccl_module() returns, faked."""

    def __init__(self, report: str = "") -> None:
        self.created: list[tuple[int, int, int, bytes]] = []  # (nranks, rank, device, unique id)
        self._refs: list[weakref.ref] = []
        self.report = report

    def nccl_unique_id(self) -> bytes:
        return os.urandom(128)

    def NcclComm(self, unique_id: bytes, nranks: int, rank: int, device: int) -> FakeComm:  # noqa: N802
        comm = FakeComm(unique_id, nranks, rank, device, report=self.report)
        self.created.append((nranks, rank, device, unique_id))
        self._refs.append(weakref.ref(comm))
        return comm

    def comm(self, i: int) -> FakeComm | None:
        """The i-th communicator made, or None once the transport has let it go."""
        return self._refs[i]()

    def install(self, monkeypatch=None) -> FakeNccl:
        if monkeypatch is None:
            transport.nccl_module = lambda: self
        else:
            monkeypatch.setattr(transport, "nccl_module", lambda: self)
        return self


@dataclass
class _Stream:
    cuda_stream: int


def fake_cuda(monkeypatch=None) -> None:
    """Current device 0; current stream of device d = 1000 + d (of the current device if None).
    Without monkeypatch (in a worker process) the attributes are simply replaced."""

    def current_stream(device=None):
        index = torch.device(device).index if device is not None else None
        return _Stream(1000 + (0 if index is None else index))

    for name, value in (("current_device", lambda: 0), ("current_stream", current_stream)):
        if monkeypatch is None:
            setattr(torch.cuda, name, value)
        else:
            monkeypatch.setattr(torch.cuda, name, value)


@dataclass
class FakeTensor:
    """What the NCCL transport reads from a tensor: its device, address and size."""

    device: torch.device
    address: int = 4096
    size: int = 12

    def data_ptr(self) -> int:
        return self.address

    def numel(self) -> int:
        return self.size

    def element_size(self) -> int:
        return 4
