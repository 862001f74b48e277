"""The loss's arguments, named once: LossSpec and GroupSpec, and the checks of the public inputs.

torch.library custom ops take tensors and primitives only, so every hardneg op receives its
options as one string, `spec.encode()` ("mode='llave';temperature=0.02;..."), turned back into the
frozen dataclass by `decode` (cached: the same options parse once). Ops, fakes and autograd rules
then read options by name; nothing is sliced by position and a new option changes this file only.
Fields are written with repr and read with ast.literal_eval, so floats round-trip exactly and
encoding changes no number; the encoder is plain string formatting so that torch.compile traces
it (it cannot trace json).

Every user-facing check lives here and runs once, in `hardneg.fused_hardneg_loss`, before any op:
messages name the argument and the value.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from hardneg._constants import (
    ALPHA,
    EGA_BETA,
    EGA_MARGIN,
    KEEP_LOGITS_BYTES,
    MODES,
    REDUCTIONS,
    STRATEGIES,
    TEMPERATURE,
    TRANSPORTS,
)

# Codes of the input dtype exchanged between ranks (distributed/layout.py); check_inputs rejects
# float64 before any exchange.
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class _Encoded:
    """encode() / decode() of a frozen dataclass of primitives as one string."""

    def encode(self) -> str:
        return ";".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))

    @classmethod
    def decode(cls, text: str):
        return _decode(cls, text)


@functools.lru_cache(maxsize=256)
def _decode(cls, text: str):
    fields = (item.partition("=") for item in text.split(";"))
    return cls(**{name: ast.literal_eval(value) for name, _, value in fields})


@dataclass(frozen=True)
class LossSpec(_Encoded):
    """Options of one loss call (hardneg.fused_hardneg_loss documents each)."""

    mode: str = "llave"
    temperature: float = TEMPERATURE
    alpha: float = ALPHA
    ega_beta: float = EGA_BETA
    ega_margin: float = EGA_MARGIN
    symmetric: bool = False
    reduction: str = "mean"
    chunk_size: int = 0  # rows of S per chunk; 0: hardneg._schedule.default_chunk_size
    check_finite: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not isinstance(self.chunk_size, int) or self.chunk_size < 0:
            raise ValueError(f"chunk_size must be a positive int or None, got {self.chunk_size!r}")

    @property
    def mode_code(self) -> int:
        """The kernels' integer code of mode (csrc/include/hardneg/hardneg_loss.h)."""
        return MODES.index(self.mode)

    @property
    def directions(self) -> int:
        """1, or 2 when symmetric (query -> target and target -> query)."""
        return 2 if self.symmetric else 1


@dataclass(frozen=True)
class GroupSpec(_Encoded):
    """Where and how the cross-device loss runs: the process group (by name, see
    hardneg.distributed.layout.register_group), every rank's (B_k, M_k) as exchanged before the
    call, the resolved strategy, the ring's transport and its logits keep budget."""

    group_name: str
    sizes: tuple[int, ...]  # B_0, M_0, B_1, M_1, ...
    strategy: str  # "ring" or "allgather" ("auto" is resolved before the op)
    transport: str = "auto"
    keep_logits_bytes: int = KEEP_LOGITS_BYTES

    def __post_init__(self) -> None:
        check_group_options(self.strategy, self.transport, self.keep_logits_bytes)
        if self.strategy == "auto":
            raise ValueError("strategy 'auto' must be resolved before the op runs")


def make_spec(
    *,
    mode,
    temperature,
    alpha,
    ega_beta,
    ega_margin,
    symmetric,
    reduction,
    chunk_size,
    check_finite,
) -> LossSpec:
    """LossSpec from the public entry's keywords (numbers coerced, chunk_size None -> 0)."""
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return LossSpec(
        mode=mode,
        temperature=float(temperature),
        alpha=float(alpha),
        ega_beta=float(ega_beta),
        ega_margin=float(ega_margin),
        symmetric=bool(symmetric),
        reduction=reduction,
        chunk_size=int(chunk_size or 0),
        check_finite=bool(check_finite),
    )


def check_group_options(strategy: str, transport: str, keep_logits_bytes: int) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
    if not isinstance(keep_logits_bytes, int) or keep_logits_bytes < 0:
        raise ValueError(f"keep_logits_bytes must be an int >= 0, got {keep_logits_bytes!r}")


def check_inputs(query, target, hard_negatives, target_ids, hard_negative_ids) -> None:
    """Types, shapes, dtypes and devices of the loss's tensors (see fused_hardneg_loss)."""
    for name, t in (("query", query), ("target", target)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hard_negatives is not None and not isinstance(hard_negatives, Tensor):
        raise TypeError(
            f"hard_negatives must be a torch.Tensor or None, got {type(hard_negatives).__name__}"
        )
    for name, t in (("query", query), ("target", target), ("hard_negatives", hard_negatives)):
        if t is not None and t.dtype == torch.float64:
            # Rejected, not rounded: the kernels compute in fp32, and an fp64 caller (a gradcheck,
            # a numerical study) would get fp32 results labelled fp64.
            raise TypeError(
                f"{name} has dtype torch.float64, which hardneg does not compute in (its kernels "
                "are fp32, with bf16 / fp16 GEMM operands on CUDA): pass float32 (x.float()), or "
                "use hardneg.hardneg_loss_reference, which computes in any dtype, for fp64 checks"
            )
        if t is not None and t.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"{name} must be a floating tensor (float32, bfloat16 or float16), "
                f"got dtype {t.dtype}"
            )
    if query.dim() != 2:
        raise ValueError(f"query must be 2-d (B, D), got shape {tuple(query.shape)}")
    if target.dim() != 2:
        raise ValueError(f"target must be 2-d (B, D), got shape {tuple(target.shape)}")
    B, D = query.shape
    if B == 0 or D == 0:
        raise ValueError(f"query must be non-empty, got shape {tuple(query.shape)}")
    if target.shape[1] != D:
        raise ValueError(f"target has dim {target.shape[1]} but query has dim {D}")
    if target.shape[0] != B:
        raise ValueError(
            f"target has {target.shape[0]} rows but query has {B}: target[i] is the "
            "positive of query[i]"
        )
    _check_like_query("target", target, query)
    if hard_negatives is not None:
        if (
            hard_negatives.dim() != 3
            or hard_negatives.shape[0] != B
            or hard_negatives.shape[2] != D
        ):
            raise ValueError(
                f"hard_negatives must have shape (B, M, D) = ({B}, M, {D}), got "
                f"{tuple(hard_negatives.shape)}"
            )
        _check_like_query("hard_negatives", hard_negatives, query)
    _check_ids(query, hard_negatives, target_ids, hard_negative_ids)


def _check_like_query(name: str, t: Tensor, query: Tensor) -> None:
    if t.dtype != query.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but query has dtype {query.dtype}")
    if t.device != query.device:
        raise ValueError(f"{name} is on {t.device} but query is on {query.device}")


def _check_ids(query, hard_negatives, target_ids, hard_negative_ids) -> None:
    if hard_negative_ids is not None and target_ids is None:
        raise ValueError(
            "hard_negative_ids needs target_ids: a hard negative is masked when its id equals the "
            "id of the query's positive (target_ids is None)"
        )
    if hard_negative_ids is not None and hard_negatives is None:
        got = (
            f"shape {tuple(hard_negative_ids.shape)}"
            if isinstance(hard_negative_ids, Tensor)
            else type(hard_negative_ids).__name__
        )
        raise ValueError(f"hard_negative_ids ({got}) was given without hard_negatives")
    B = query.shape[0]
    hn_shape = tuple(hard_negatives.shape[:2]) if hard_negatives is not None else None
    for name, ids, shape in (
        ("target_ids", target_ids, (B,)),
        ("hard_negative_ids", hard_negative_ids, hn_shape),
    ):
        if ids is None:
            continue
        if not isinstance(ids, Tensor) or ids.dtype != torch.int64:
            raise TypeError(
                f"{name} must be an int64 tensor, got "
                f"{ids.dtype if isinstance(ids, Tensor) else type(ids).__name__}"
            )
        if tuple(ids.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(ids.shape)}")
        if ids.device != query.device:
            raise ValueError(f"{name} is on {ids.device} but query is on {query.device}")
