"""CUDA kernels of the fused hard-negative loss (hardneg._C_cuda) against the fp64 reference.

Every test needs a CUDA GPU and a CUDA build of hardneg; without them the whole module is skipped
and says which is missing.

Tolerances (flash-attention's rule, design section 6): with truth = hardneg_loss_reference in fp64
on the same (dtype-rounded) inputs, the fused result's max error must be at most 2x the error of
plain torch (the same reference run in the input dtype) plus a floor of REL_FLOOR x the largest
|truth|. The floor covers fp32's own rounding: at tau = 0.02 a logit reaches 1/tau + alpha = 59,
where one fp32 ulp is 3.8e-6, so exp() of it and anything built from it carries ~1e-6 relative
noise; 1e-5 of the largest gradient (LOSS_FLOOR for the loss) leaves headroom without hiding a
real error (a 0.1 % change of tau fails, see test_comparison_can_fail). Low-precision inputs are
accumulated in fp32, so their loss must also meet the fp32 bound alone, and their gradients may
differ from the fp32 path's only by the final rounding to the input dtype.

Legend: B queries, M hard negatives per query, N = B + B*M candidates, D embedding dim.
"""

from __future__ import annotations

import hardneg
import pytest
import torch
import torch.nn.functional as F
from hardneg import _ops
from hardneg._schedule import default_chunk_size

DEVICE = torch.device("cuda")
REL_FLOOR = 1e-5
# The loss is lse - z_pos, a difference of logits up to 1/tau + alpha = 59 (unit-norm inputs), so
# its fp32 error is a few ulp of 59 (3.8e-6 each) whatever its own size: 15 ulp of headroom.
LOSS_FLOOR = 1e-6 * (1 / hardneg.TEMPERATURE + hardneg.ALPHA)
# Unit roundoff of the dtypes the gradients are returned in.
ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs a CUDA GPU (torch.cuda.is_available() is False)",
    ),
    pytest.mark.skipif(
        not hardneg.build_info()["cuda"],
        reason="hardneg was built without its CUDA module (build_info()['cuda'] is False); "
        "tests/test_build.py says whether that was expected",
    ),
]

MODES = ("infonce", "llave", "ega")
SIZES = [(1, 59), (7, 128), (257, 59), (1500, 128)]  # (B, D)


@pytest.fixture(autouse=True)
def _ieee_fp32_matmul():
    """fp32 GEMMs in IEEE fp32 (no TF32), so plain torch's fp32 error is fp32's."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


# ---------------------------------------------------------------------------------------------
# Inputs and the comparison rule
# ---------------------------------------------------------------------------------------------


def make_inputs(B: int, D: int, M: int, masked: bool, dtype: torch.dtype, seed: int = 0) -> dict:
    """Unit-norm queries, positives correlated with them and hard negatives close to the
    positives (so EGA's amplification and LLaVE's weighting are active), in `dtype` on DEVICE.
    With `masked`, ids repeat (in-batch false negatives) and about half of the hard negatives
    carry their own positive's id."""
    g = torch.Generator().manual_seed(seed)
    # Noise of norm ~1.5 around unit queries: positives at cosine ~0.55, so the loss is O(1) even
    # at B = 1500 (in-batch negatives at cosine 0 +- D^-1/2); hard negatives at cosine ~0.9 to
    # their positive reach within EGA's margin of it.
    q_BD = F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=-1)
    noise_BD = 1.5 / D**0.5 * torch.randn(B, D, generator=g, dtype=torch.float64)
    t_BD = F.normalize(q_BD + noise_BD, dim=-1)
    inputs = {"query": q_BD, "target": t_BD, "hard_negatives": None}
    if M:
        noise_BMD = 0.5 / D**0.5 * torch.randn(B, M, D, generator=g, dtype=torch.float64)
        inputs["hard_negatives"] = F.normalize(t_BD[:, None, :] + noise_BMD, dim=-1)
    if masked:
        target_ids_B = torch.randint(0, max(1, B // 2), (B,), generator=g)
        inputs["target_ids"] = target_ids_B
        if M:
            ids_BM = torch.randint(0, max(1, B // 2), (B, M), generator=g)
            same_BM = torch.rand(B, M, generator=g) < 0.5
            inputs["hard_negative_ids"] = torch.where(same_BM, target_ids_B[:, None], ids_BM)
    out = {}
    for k, v in inputs.items():
        if v is None:
            out[k] = None
        elif v.is_floating_point():
            out[k] = v.to(dtype).to(DEVICE)
        else:
            out[k] = v.to(DEVICE)
    return out


def loss_and_grads(fn, inputs: dict, dtype: torch.dtype, weights_B=None, **opts):
    """Loss of fn and its gradients w.r.t. query, target, hard_negatives, computed in `dtype`.
    reduction "none" is reduced as sum(loss * weights_B), so the row scale path is exercised."""
    leaves = {}
    kwargs = {}
    for k, v in inputs.items():
        if v is not None and v.is_floating_point():
            leaves[k] = v.detach().to(dtype).requires_grad_()
            kwargs[k] = leaves[k]
        else:
            kwargs[k] = v
    loss = fn(kwargs.pop("query"), kwargs.pop("target"), **kwargs, **opts)
    total = (loss * weights_B).sum() if weights_B is not None else loss
    grads = torch.autograd.grad(total, list(leaves.values()))
    return loss.detach(), dict(zip(leaves, grads, strict=True))


def check_close(out: torch.Tensor, plain: torch.Tensor, truth: torch.Tensor, what: str) -> None:
    """max|out - truth| <= 2 max|plain - truth| + REL_FLOOR max|truth| (module docstring)."""
    assert out.shape == truth.shape, f"{what}: shape {tuple(out.shape)} != {tuple(truth.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    err = (out.double() - truth).abs().max().item()
    plain_err = (plain.double() - truth).abs().max().item()
    scale = truth.abs().max().item()
    floor = LOSS_FLOOR if what == "loss" else REL_FLOOR * scale
    tol = 2 * plain_err + floor
    assert err <= tol, (
        f"{what}: max error {err:.3g} > {tol:.3g} = 2 x plain torch's {plain_err:.3g} + "
        f"floor {floor:.3g}"
    )


def check_rounding_only(out: torch.Tensor, fp32: torch.Tensor, what: str) -> None:
    """A low-precision gradient is the fp32 gradient of the same (exactly upcast) inputs, rounded
    once: elementwise within 2 unit roundoffs of the dtype (a rerun may land across a rounding
    boundary) plus one subnormal step (fp16 gradients of a mean over B = 1500 fall below 2^-14,
    where the spacing is fixed)."""
    u = ROUNDOFF[out.dtype]
    info = torch.finfo(out.dtype)
    subnormal_step = info.smallest_normal * info.eps
    err_N = (out.double() - fp32.double()).abs()
    tol_N = 2 * u * fp32.double().abs() + subnormal_step
    worst = (err_N - tol_N).max().item()
    assert worst <= 0, f"{what}: an element exceeds its rounding bound by {worst:.3g}"


def compare_with_reference(
    inputs: dict, dtype: torch.dtype, weights_B=None, **opts
) -> tuple[torch.Tensor, dict]:
    """Runs fused (CUDA), plain torch in `dtype` and the fp64 truth; asserts the rule for the loss
    and every gradient. Returns the fused loss and gradients."""
    ref = hardneg.hardneg_loss_reference
    ref_opts = {k: v for k, v in opts.items() if k != "chunk_size"}
    w64 = weights_B.double() if weights_B is not None else None
    wd = weights_B.to(dtype) if weights_B is not None else None
    loss, grads = loss_and_grads(hardneg.fused_hardneg_loss, inputs, dtype, weights_B, **opts)
    loss_plain, grads_plain = loss_and_grads(ref, inputs, dtype, wd, **ref_opts)
    loss_64, grads_64 = loss_and_grads(ref, inputs, torch.float64, w64, **ref_opts)
    assert loss.dtype == torch.float32
    check_close(loss, loss_plain, loss_64, "loss")
    # fp32 accumulation whatever the input dtype: the loss meets the fp32 bound on its own.
    loss_err = (loss.double() - loss_64).abs().max().item()
    assert loss_err <= LOSS_FLOOR, f"loss error {loss_err:.3g} > {LOSS_FLOOR:.3g} (fp32 bound)"
    if dtype != torch.float32:
        loss_32, grads_32 = loss_and_grads(
            hardneg.fused_hardneg_loss, inputs, torch.float32, weights_B, **opts
        )
        torch.testing.assert_close(loss, loss_32, rtol=1e-6, atol=0)
    for k, g in grads.items():
        assert g.dtype == dtype, f"grad of {k} has dtype {g.dtype}, input has {dtype}"
        check_close(g, grads_plain[k], grads_64[k], f"grad of {k}")
        if dtype != torch.float32:
            check_rounding_only(g, grads_32[k], f"grad of {k}")
    return loss, grads


# ---------------------------------------------------------------------------------------------
# fused_hardneg_loss on CUDA against the reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("B,D", SIZES, ids=[f"B{b}-D{d}" for b, d in SIZES])
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("M", [0, 3], ids=["M0", "M3"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["onedir", "symmetric"])
@pytest.mark.parametrize("mode", MODES)
def test_matches_reference_fp32(mode, symmetric, M, masked, B, D):
    inputs = make_inputs(B, D, M, masked, torch.float32, seed=B + D + M)
    # 61 rows per chunk: B = 257 and 1500 cross several chunk boundaries, with a partial last one.
    compare_with_reference(inputs, torch.float32, mode=mode, symmetric=symmetric, chunk_size=61)


def test_default_chunking_crosses_boundaries():
    B, D, M = 1500, 59, 5
    N = B + B * M
    assert default_chunk_size(N) < B, "the default chunk must split this batch"
    inputs = make_inputs(B, D, M, True, torch.float32, seed=3)
    compare_with_reference(inputs, torch.float32, mode="llave", symmetric=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["onedir", "symmetric"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("B,D,M", [(257, 59, 2), (1500, 128, 0)], ids=["B257", "B1500"])
def test_matches_reference_low_precision(B, D, M, mode, symmetric, dtype):
    inputs = make_inputs(B, D, M, True, dtype, seed=11)
    compare_with_reference(inputs, dtype, mode=mode, symmetric=symmetric, chunk_size=100)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("mode", MODES)
def test_reductions(mode, reduction):
    B, D, M = 257, 59, 2
    inputs = make_inputs(B, D, M, True, torch.float32, seed=5)
    # "none" backpropagates through random per-row weights: the kernels' row_scale path.
    g = torch.Generator().manual_seed(1)
    weights_B = torch.rand(B, generator=g).to(DEVICE) if reduction == "none" else None
    compare_with_reference(
        inputs,
        torch.float32,
        weights_B=weights_B,
        mode=mode,
        symmetric=True,
        reduction=reduction,
        chunk_size=64,
    )


def test_comparison_can_fail():
    """The rule above must notice a 0.1 % change of temperature (and a wrong gradient)."""
    inputs = make_inputs(257, 59, 2, True, torch.float32, seed=2)
    loss, grads = loss_and_grads(
        hardneg.fused_hardneg_loss, inputs, torch.float32, temperature=0.02 * 1.001
    )
    loss_plain, grads_plain = loss_and_grads(hardneg.hardneg_loss_reference, inputs, torch.float32)
    loss_64, grads_64 = loss_and_grads(hardneg.hardneg_loss_reference, inputs, torch.float64)
    with pytest.raises(AssertionError, match="loss: max error"):
        check_close(loss, loss_plain, loss_64, "loss")
    with pytest.raises(AssertionError, match="grad of query"):
        check_close(grads["query"], grads_plain["query"], grads_64["query"], "grad of query")
    bumped = grads_plain["target"].clone()
    bumped[3, 7] += 1e-3 * grads_64["target"].abs().max()
    _, grads_ok = loss_and_grads(hardneg.fused_hardneg_loss, inputs, torch.float32)
    check_close(grads_ok["target"], grads_plain["target"], grads_64["target"], "grad of target")
    with pytest.raises(AssertionError, match="grad of target"):
        check_close(bumped, grads_ok["target"], grads_64["target"], "grad of target")


def test_deterministic():
    """No atomics: two runs give bitwise the same loss and gradients."""
    inputs = make_inputs(1500, 128, 3, True, torch.float32, seed=9)
    opts = {"mode": "ega", "symmetric": True, "chunk_size": 100}
    loss_a, grads_a = loss_and_grads(hardneg.fused_hardneg_loss, inputs, torch.float32, **opts)
    loss_b, grads_b = loss_and_grads(hardneg.fused_hardneg_loss, inputs, torch.float32, **opts)
    assert torch.equal(loss_a, loss_b)
    for k in grads_a:
        assert torch.equal(grads_a[k], grads_b[k]), k


def test_runs_on_the_current_stream():
    """Kernels launch on torch's current stream: work queued on a side stream stays ordered."""
    inputs = make_inputs(257, 59, 2, True, torch.float32, seed=4)
    expected, _ = loss_and_grads(hardneg.fused_hardneg_loss, inputs, torch.float32)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        # A long GEMM first, so a kernel launched on another stream would read unfinished data.
        big = torch.randn(4096, 4096, device=DEVICE)
        for _ in range(4):
            big = big @ big / 64
        fresh = {k: (v.clone() if v is not None else None) for k, v in inputs.items()}
        got, _ = loss_and_grads(hardneg.fused_hardneg_loss, fresh, torch.float32)
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_tensors_on_a_non_current_device():
    inputs = make_inputs(257, 59, 2, True, torch.float32, seed=6)
    expected, _ = loss_and_grads(hardneg.fused_hardneg_loss, inputs, torch.float32)
    on_1 = {k: (v.to("cuda:1") if v is not None else None) for k, v in inputs.items()}
    with torch.cuda.device(0):
        got, _ = loss_and_grads(hardneg.fused_hardneg_loss, on_1, torch.float32)
    torch.testing.assert_close(got.cpu(), expected.cpu(), rtol=1e-6, atol=0)


def test_opcheck():
    inputs = make_inputs(7, 59, 2, True, torch.float32, seed=8)
    q = inputs["query"].requires_grad_()
    t = inputs["target"].requires_grad_()
    h = inputs["hard_negatives"].requires_grad_()
    args = (q, t, h, inputs["target_ids"], inputs["hard_negative_ids"])
    args += ("ega", 0.02, 9.0, 5.0, 0.1, True, "mean", 0, True, True)
    torch.library.opcheck(torch.ops.hardneg.hardneg_loss.default, args)


# ---------------------------------------------------------------------------------------------
# The kernels themselves: CUDA against the CPU kernels, column blocks against rows
# ---------------------------------------------------------------------------------------------

MODE_CODES = {"infonce": 0, "llave": 1, "ega": 2}
# Kernel-to-kernel tolerances: the two sides sum in different orders and use different exp
# implementations (each within ~1 ulp), so lse (up to ~60) may differ by a few ulp (3.8e-6 each);
# dS = exp(z - lse) * scale inherits that as a relative error of a few 1e-6.
STATS_TOL = {"rtol": 1e-6, "atol": 3e-5}
DS_REL = 2e-5


class Block:
    """One similarity block S (rows x cols, row stride ld) plus its ids and per-row outputs, on
    one device; `params` points the kernels at it."""

    def __init__(self, s_RL, cols, row_ids, col_ids, row_scale):
        self.s_RL = s_RL  # (rows, ld); only the first cols columns are the block
        self.cols = cols
        self.row_ids, self.col_ids, self.row_scale = row_ids, col_ids, row_scale
        rows = s_RL.shape[0]
        self.stats_6R = torch.zeros(6, rows, dtype=torch.float32, device=s_RL.device)
        self.stats_6R[4].fill_(float("-inf"))  # run_max starts empty, run_sum at 0

    def to(self, device):
        """A copy on `device` (always a copy: the kernels write S and the statistics)."""

        def copy(x):
            return x.to(device, copy=True) if x is not None else None

        out = Block(
            copy(self.s_RL), self.cols, copy(self.row_ids), copy(self.col_ids), copy(self.row_scale)
        )
        out.stats_6R = copy(self.stats_6R)
        return out

    def params(self, mode, pos_offset, need_grad, grad_scale=0.37):
        device = self.s_RL.device
        p = _ops.new_params(device)
        p.s = self.s_RL.data_ptr()
        p.rows, p.cols, p.ld_s = self.s_RL.shape[0], self.cols, self.s_RL.stride(0)
        p.pos_offset = pos_offset
        if self.row_ids is not None:
            p.row_ids, p.col_ids = self.row_ids.data_ptr(), self.col_ids.data_ptr()
        p.mode, p.inv_tau, p.alpha = MODE_CODES[mode], 50.0, 9.0
        p.ega_beta, p.ega_margin = 5.0, 0.1
        names = ("lse", "loss", "z_pos", "s_pos", "run_max", "run_sum")
        for k, name in enumerate(names):
            setattr(p, name, self.stats_6R[k].data_ptr())
        p.grad_scale = grad_scale
        if self.row_scale is not None:
            p.row_scale = self.row_scale.data_ptr()
        p.need_grad = need_grad
        return p


def random_block(rows, cols, ld, masked, scaled, seed):
    g = torch.Generator().manual_seed(seed)
    s_RL = torch.rand(rows, ld, generator=g) * 2 - 1  # cosine-like similarities
    row_ids = col_ids = row_scale = None
    if masked:
        row_ids = torch.randint(0, 4, (rows,), generator=g)
        col_ids = torch.randint(0, 4, (cols,), generator=g)
    if scaled:
        row_scale = torch.rand(rows, generator=g) + 0.5
    return Block(s_RL, cols, row_ids, col_ids, row_scale).to(DEVICE)


def assert_ds_close(got_RC, want_RC, what):
    tol = DS_REL * want_RC.abs().max().item()
    err = (got_RC - want_RC).abs().max().item()
    assert err <= tol, f"{what}: dS max error {err:.3g} > {tol:.3g}"


KERNEL_SHAPES = [(1, 1), (9, 31), (9, 32), (20, 33), (300, 1024), (300, 1025), (9, 5000)]


@pytest.mark.parametrize("rows,cols", KERNEL_SHAPES, ids=[f"{r}x{c}" for r, c in KERNEL_SHAPES])
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("mode", MODES)
def test_rows_kernel_matches_cpu(mode, masked, rows, cols):
    ld = cols + 3  # a row stride wider than the block
    pos_offset = (cols - rows) // 2  # every row's positive inside the block, not on the diagonal
    kernels_cuda, kernels_cpu = _ops.kernels_for(DEVICE), _ops.kernels_for(torch.device("cpu"))
    for need_grad in (False, True):
        gpu = random_block(rows, cols, ld, masked, scaled=need_grad, seed=rows * cols)
        cpu = gpu.to("cpu")
        kernels_cuda.hardneg_loss_rows(gpu.params(mode, pos_offset, need_grad))
        kernels_cpu.hardneg_loss_rows(cpu.params(mode, pos_offset, need_grad))
        torch.testing.assert_close(gpu.stats_6R[:4].cpu(), cpu.stats_6R[:4], **STATS_TOL)
        assert_ds_close(gpu.s_RL[:, :cols].cpu(), cpu.s_RL[:, :cols], f"need_grad={need_grad}")
        # Columns past the block are never touched.
        assert torch.equal(gpu.s_RL[:, cols:].cpu(), cpu.s_RL[:, cols:])


BLOCK_WIDTHS = [3, 100, 1025]


@pytest.mark.parametrize("width", BLOCK_WIDTHS, ids=[f"w{w}" for w in BLOCK_WIDTHS])
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("mode", MODES)
def test_block_kernels_match_rows_kernel(mode, masked, width):
    """The column-block schedule (online merge, positive in one block or none) gives the row
    schedule's statistics and dS, on the GPU and against the CPU block kernels."""
    rows, cols, row0 = 70, 2100, 1000  # rows are queries row0 .. row0 + rows - 1 of the batch
    full = random_block(rows, cols, cols, masked, scaled=True, seed=width)
    rows_ref = Block(full.s_RL.clone(), cols, full.row_ids, full.col_ids, full.row_scale)
    kernels_cuda = _ops.kernels_for(DEVICE)
    kernels_cuda.hardneg_loss_rows(rows_ref.params(mode, row0, need_grad=True))

    def run_blocks(kernels, blk):
        views = []
        for c0 in range(0, cols, width):
            c1 = min(cols, c0 + width)
            ids = blk.col_ids[c0:c1] if blk.col_ids is not None else None
            view = Block(blk.s_RL[:, c0:c1], c1 - c0, blk.row_ids, ids, blk.row_scale)
            view.stats_6R = blk.stats_6R  # one set of running statistics for all blocks
            views.append((c0, view))
            kernels.hardneg_loss_block_update(view.params(mode, row0 - c0, need_grad=False))
        blk.stats_6R[0] = blk.stats_6R[4] + blk.stats_6R[5].log()  # lse = m + log l
        for c0, view in views:
            kernels.hardneg_loss_block_grad(view.params(mode, row0 - c0, need_grad=False))

    gpu = Block(full.s_RL.clone(), cols, full.row_ids, full.col_ids, full.row_scale)
    run_blocks(kernels_cuda, gpu)
    cpu = full.to("cpu")
    run_blocks(_ops.kernels_for(torch.device("cpu")), cpu)
    lse_z_s = [0, 2, 3]  # lse, z_pos, s_pos
    torch.testing.assert_close(gpu.stats_6R[lse_z_s], rows_ref.stats_6R[lse_z_s], **STATS_TOL)
    torch.testing.assert_close(gpu.stats_6R.cpu()[lse_z_s], cpu.stats_6R[lse_z_s], **STATS_TOL)
    assert_ds_close(gpu.s_RL, rows_ref.s_RL, "blocks vs rows")
    assert_ds_close(gpu.s_RL.cpu(), cpu.s_RL, "CUDA blocks vs CPU blocks")


def test_kernel_comparison_can_fail():
    """A 1e-4 relative change of one dS entry, or one ulp-scale shift of lse by 1e-4, is caught."""
    gpu = random_block(9, 300, 300, True, scaled=True, seed=1)
    _ops.kernels_for(DEVICE).hardneg_loss_rows(gpu.params("llave", 100, need_grad=True))
    ds = gpu.s_RL.cpu()
    bumped = ds.clone()
    bumped[4, 17] += 1e-4 * ds.abs().max()
    with pytest.raises(AssertionError, match="dS max error"):
        assert_ds_close(bumped, ds, "perturbed")
    stats = gpu.stats_6R[:4].cpu()
    shifted = stats.clone()
    shifted[0, 2] += 1e-4
    with pytest.raises(AssertionError):
        torch.testing.assert_close(shifted, stats, **STATS_TOL)
