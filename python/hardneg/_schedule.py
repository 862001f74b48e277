"""The row schedule over the hardneg kernels, and the pieces every schedule shares (design 2).

Row pass: queries are cut into row chunks; each chunk sees its whole candidate row, so one pass
over a chunk gives the loss and, when a gradient will be needed, dS, dQ and dC (3 GEMMs, the
floor). dS overwrites the fp32 S in place, or, for low-precision GEMM operands, the kernel writes
it in the operand dtype into a buffer of its own that the gradient GEMMs read (hardneg._gemm).
The B x N logits matrix never exists: extra memory is O(chunk x N). The single-process
loss (hardneg.loss) and the all-gather strategy (hardneg.distributed.allgather) run it; the ring
(hardneg.distributed.ring) runs the column-block kernels with the same parameters.

Legend: B rows, N candidates, D embedding dim, R rows in a chunk, K columns of one block.
Suffixes name shapes: rows_BD, cands_ND, s_RN.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hardneg import _gemm, _ops
from hardneg._constants import UNMASKED_ID
from hardneg._spec import LossSpec

# CPU: a chunk of S holds at most this many bytes unless one row alone is larger: big enough that
# the chunk GEMMs run at full speed and the rank-R updates of dC stay few, small next to the
# inputs. Measured on CPU (benchmarks/results/bench_loss_*): 256 to 1024 rows within 7% of each
# other, 64 rows 1.15-1.25x and 16 rows 1.5-2x slower. The budget covers a chunk's dS buffer too:
# a row of fp32 S costs 4 N bytes, plus 2 N for its bf16 / fp16 dS on the low-precision path,
# which so gets 2/3 of the rows (default_chunk_size).
CHUNK_BYTES = 32 * 2**20
# CUDA: 1/64 of the device's memory, at most 2 GiB (1.25 GiB on an 80 GB H100: at N = 65536, 5097
# rows of fp32 S, 3398 of S with their bf16 dS; 424 of those at N = 2^19). Occupancy: the row
# kernels run one block per row, and an H100 holds ~1000 resident blocks (132 SMs), so R >= 1024
# fills it in one wave where R = 128 used an eighth.
# Traffic: each chunk's dC += dS^T Q reads and writes all of dC (8 N D bytes) for 2 R N D flops,
# R / 4 flop per byte: R >= 1024 keeps that update above the bf16 ridge of ~300 flop/byte (990
# TFLOP/s over 3.35 TB/s), i.e. GEMM-bound, not memory-bound.
CUDA_CHUNK_FRACTION = 64
CUDA_CHUNK_MAX_BYTES = 2 * 2**30


def chunk_bytes(device: torch.device) -> int:
    """The memory budget of one chunk (its S and dS buffers) on `device` (see the constants
    above)."""
    if device.type != "cuda":
        return CHUNK_BYTES
    total = torch.cuda.get_device_properties(device).total_memory
    return min(total // CUDA_CHUNK_FRACTION, CUDA_CHUNK_MAX_BYTES)


def default_chunk_size(
    num_candidates: int,
    device: torch.device | None = None,
    ds_dtype: torch.dtype | None = None,
) -> int:
    """Rows per chunk of S for N candidates: chunk_bytes(device) over the bytes of a row, at least
    16 rows. A row holds N fp32 similarities and, when the kernels write dS into a buffer of its
    own (ds_dtype, hardneg._gemm.grad_dtype), N of those too."""
    budget = chunk_bytes(device) if device is not None else CHUNK_BYTES
    row_bytes = 4 + (ds_dtype.itemsize if ds_dtype is not None else 0)
    return max(16, budget // (row_bytes * max(num_candidates, 1)))


def chunk_rows(
    spec: LossSpec,
    num_candidates: int,
    device: torch.device,
    ds_dtype: torch.dtype | None = None,
) -> int:
    """Rows per chunk: the spec's chunk_size (the user's override), or the device's default for
    chunks that also hold a dS buffer of ds_dtype (None: none)."""
    return spec.chunk_size or default_chunk_size(num_candidates, device, ds_dtype)


def candidate_ids(
    target_ids: Tensor | None, hard_negative_ids: Tensor | None, hard_negatives: Tensor | None
) -> Tensor | None:
    """Ids of the candidates [target; hard negatives] (N,), dense, or None without target_ids.
    Hard negatives without ids get UNMASKED_ID: no positive has it, so none is ever masked."""
    if target_ids is None:
        return None
    if hard_negatives is None:
        return target_ids.contiguous()
    if hard_negative_ids is None:
        B, M = hard_negatives.shape[:2]
        hard_negative_ids = target_ids.new_full((B, M), UNMASKED_ID)
    return torch.cat([target_ids, hard_negative_ids.reshape(-1)])


def kernel_params(device: torch.device, spec: LossSpec, need_grad: bool, grad_scale: float):
    """The kernels' parameter struct with the loss options set; the schedule fills the rest."""
    params = _ops.new_params(device)
    params.mode = spec.mode_code
    params.inv_tau = 1.0 / spec.temperature
    params.alpha = spec.alpha
    params.ega_beta = spec.ega_beta
    params.ega_margin = spec.ega_margin
    params.need_grad = need_grad
    params.grad_scale = grad_scale
    return params


def grad_scale_of(spec: LossSpec, num_queries: int) -> float:
    """dL/dS scale of one row: 1/B (B all queries, every rank's) for mean, 1/2 per direction when
    symmetric."""
    scale = 1.0 / num_queries if spec.reduction == "mean" else 1.0
    return scale * (0.5 if spec.symmetric else 1.0)


def row_scale(grad_loss: Tensor | None, B: int, reduction: str) -> Tensor | None:
    """grad_output per row (B,) in fp32, or None when backward runs at grad_output = 1."""
    if grad_loss is None:
        return None
    if reduction == "none":
        return grad_loss.float().contiguous()
    return grad_loss.float().expand(B).contiguous()


def fuses_grad(spec: LossSpec, *tensors: Tensor | None) -> bool:
    """Whether the forward computes the gradient too: autograd will need one and the loss is a
    scalar (backward can only scale a fused gradient by one number)."""
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return wants_grad and spec.reduction != "none"


def reduce(loss_B: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return loss_B.mean()
    if reduction == "sum":
        return loss_B.sum()
    return loss_B


def row_pass(
    rows_BD: Tensor,
    cands_ND: Tensor | tuple[Tensor, ...],
    row_ids_B: Tensor | None,
    col_ids_N: Tensor | None,
    spec: LossSpec,
    loss_B: Tensor,
    grad_scale: float,
    row_scale_B: Tensor | None,
    d_rows_BD: Tensor | None,
    d_cands_ND: Tensor | tuple[Tensor, ...] | None,
    *,
    accumulate: bool = True,
) -> None:
    """One direction of the loss: row i's positive is candidate i. Writes loss_B and, when
    d_rows_BD is given, accumulates dL/drows and dL/dcands scaled by grad_scale * row_scale_B.
    rows_BD and cands_ND are GEMM operands (hardneg._gemm.operand); d_rows_BD, d_cands_ND fp32.
    Chunks of chunk_rows(spec, N, ...) rows, one fp32 S buffer and, for low-precision operands
    with a gradient, one dS buffer in their dtype, both reused by every chunk.

    cands_ND may be a tuple of column blocks (N_k, D) standing for their concatenation, with
    d_cands_ND the matching tuple: [target; hard negatives] then needs no concatenated copy (the
    GEMMs write and read column slices of S in place). accumulate=False overwrites d_rows_BD and
    d_cands_ND instead of adding to them, so they need no zero fill.
    """
    blocks = (cands_ND,) if isinstance(cands_ND, Tensor) else tuple(cands_ND)
    need_grad = d_rows_BD is not None
    d_blocks = ()
    if need_grad:
        d_blocks = (d_cands_ND,) if isinstance(d_cands_ND, Tensor) else tuple(d_cands_ND)
    spans, N = [], 0
    for c in blocks:
        spans.append((N, N + c.shape[0]))
        N += c.shape[0]
    B = rows_BD.shape[0]
    device = rows_BD.device
    ds_dtype = _gemm.grad_dtype(blocks[0]) if need_grad else None
    R = min(chunk_rows(spec, N, device, ds_dtype), B)
    s_buf = torch.empty(R * N, dtype=torch.float32, device=device)
    ds_buf = torch.empty(R * N, dtype=ds_dtype, device=device) if ds_dtype is not None else None
    stats_3B = torch.empty(3, B, dtype=torch.float32, device=device)  # lse, z_pos, s_pos
    kernels = _ops.kernels_for(device)
    params = kernel_params(device, spec, need_grad, grad_scale)
    params.cols = N
    params.ld_s = N
    if ds_buf is not None:
        params.ld_ds = N
        params.ds_dtype = _gemm.DS_DTYPE_CODES[ds_dtype]
    if col_ids_N is not None:
        params.col_ids = col_ids_N.data_ptr()
    for r0 in range(0, B, R):
        r1 = min(B, r0 + R)
        rows_RD = rows_BD[r0:r1]
        s_RN = s_buf[: (r1 - r0) * N].view(r1 - r0, N)
        for c_KD, (c0, c1) in zip(blocks, spans, strict=True):
            _gemm.mm(rows_RD, c_KD.T, out=s_RN[:, c0:c1])  # (R, D) x (D, K) -> (R, K)
        params.s = s_RN.data_ptr()
        # dS: in place of S (fp32 operands), or the operand-dtype buffer the kernel writes.
        ds_RN = s_RN if ds_buf is None else ds_buf[: (r1 - r0) * N].view(r1 - r0, N)
        if ds_buf is not None:
            params.ds = ds_RN.data_ptr()
        params.rows = r1 - r0
        params.pos_offset = r0
        params.lse = stats_3B[0, r0:].data_ptr()
        params.z_pos = stats_3B[1, r0:].data_ptr()
        params.s_pos = stats_3B[2, r0:].data_ptr()
        params.loss = loss_B[r0:].data_ptr()
        if row_ids_B is not None:
            params.row_ids = row_ids_B[r0:].data_ptr()
        if row_scale_B is not None:
            params.row_scale = row_scale_B[r0:].data_ptr()
        kernels.hardneg_loss_rows(params)  # ds_RN now holds dL/dS when need_grad
        if not need_grad:
            continue
        for k, (c_KD, d_c_KD, (c0, c1)) in enumerate(zip(blocks, d_blocks, spans, strict=True)):
            ds_RK = ds_RN[:, c0:c1]
            if k == 0 and not accumulate:
                _gemm.mm(ds_RK, c_KD, out=d_rows_BD[r0:r1])  # (R, K) x (K, D) -> (R, D)
            else:
                _gemm.addmm_(d_rows_BD[r0:r1], ds_RK, c_KD)
            if r0 == 0 and not accumulate:
                _gemm.mm(ds_RK.T, rows_RD, out=d_c_KD)  # (K, R) x (R, D) -> (K, D)
            else:
                _gemm.addmm_(d_c_KD, ds_RK.T, rows_RD)
