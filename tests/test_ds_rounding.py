"""hardneg_round_bf16 / hardneg_round_fp16, the rounding of a dS output to the gradient GEMMs'
low-precision operand dtype (csrc/include/hardneg/hardneg_loss_math.h), against torch's .to().

Claim under test: for every fp32 value that is not NaN, the bits of torch's .to(torch.bfloat16) /
.to(torch.float16) (round to nearest, ties to even; subnormals kept; overflow to +-inf); a NaN
gives a NaN. The inputs cover each class of fp32 bit pattern: random bits; every bf16 / fp16
value, the exact midpoint (a tie) between it and the next one, and the fp32 neighbours of both;
the overflow thresholds; +-0, +-inf, quiet and signalling NaNs of both signs; fp32 subnormals.
The comparison can fail: truncation and round-half-away-from-zero are both caught. These run the
ISA variant chosen for this machine; tests/cpu_isa_worker.py repeats the check under every
variant the machine runs.
"""

from __future__ import annotations

import pytest
import torch
from hardneg import _C, _gemm

DTYPES = (torch.bfloat16, torch.float16)
IDS = ("bf16", "fp16")


def hardneg_round(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x (fp32) rounded by the kernels' conversion to `dtype`."""
    x = x.contiguous()
    y = torch.empty(x.shape, dtype=dtype)
    _C.hardneg_round(x.data_ptr(), y.data_ptr(), x.numel(), _gemm.DS_DTYPE_CODES[dtype])
    return y


def from_bits(bits: torch.Tensor) -> torch.Tensor:
    """fp32 values of int64 bit patterns (taken modulo 2^32)."""
    bits = bits & 0xFFFFFFFF
    return torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)


def fp32_bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def step_magnitude(r: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The next value of r's format above (up) or below r in magnitude, same sign; from 0 up,
    the smallest subnormal."""
    bits = r.view(torch.int16).to(torch.int32)
    return (bits + torch.where(up, 1, -1)).to(torch.int16).view(r.dtype)


def neighbours(x: torch.Tensor) -> torch.Tensor:
    """x and the next fp32 value on either side."""
    up = torch.nextafter(x, torch.tensor(float("inf")))
    down = torch.nextafter(x, torch.tensor(float("-inf")))
    return torch.cat([x, up, down])


def every_value_and_tie(dtype: torch.dtype) -> torch.Tensor:
    """Every non-NaN value of `dtype` (as fp32, exact), the midpoint between each one and the
    next of larger magnitude (exact in fp32: the formats carry 8 and 11 significant bits), the
    midpoint past the largest finite value (the overflow threshold), and the fp32 neighbours of
    all of them."""
    codes = torch.arange(2**16, dtype=torch.int32).to(torch.int16).view(dtype)
    values = codes.float()
    values = values[~values.isnan()]
    finite = values[values.isfinite()]
    mag = finite.abs()
    order = torch.argsort(mag[finite >= 0])
    pos = mag[finite >= 0][order]  # 0, the subnormals, the normals, up to the largest
    ulp_top = pos[-1] - pos[-2]
    mids = torch.cat([(pos[:-1] + pos[1:]) / 2, (pos[-1] + ulp_top / 2).reshape(1)])
    points = torch.cat([values, mids, -mids])
    return neighbours(points[points.isfinite()])


def random_bits(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return from_bits(torch.randint(0, 2**32, (n,), generator=g, dtype=torch.int64))


def specials() -> torch.Tensor:
    """+-0, +-inf, FLT_MAX, FLT_MIN, fp32 subnormals (smallest, largest, random), and NaNs of
    both signs: quiet, signalling, with and without payloads."""
    g = torch.Generator().manual_seed(3)
    sub = torch.randint(1, 2**23, (4096,), generator=g, dtype=torch.int64)
    nans = torch.tensor([0x7FC00000, 0x7F800001, 0x7FBFFFFF, 0x7FFFFFFF, 0x7FC00001, 0x7FA5A5A5])
    bits = torch.cat(
        [
            torch.tensor([0, 2**31, 0x7F800000, 0xFF800000, 0x7F7FFFFF, 0xFF7FFFFF, 0x00800000]),
            torch.tensor([1, 0x007FFFFF, 0x80000001, 0x807FFFFF]),
            sub,
            sub | 2**31,
            nans,
            nans | 2**31,
        ]
    )
    return from_bits(bits)


def all_classes(dtype: torch.dtype) -> torch.Tensor:
    return torch.cat([random_bits(1 << 22, 0), every_value_and_tie(dtype), specials()])


def mismatches(got: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> int:
    """Elements whose bits differ from torch's .to(dtype) (NaN inputs: that got is NaN)."""
    want = x.to(dtype)
    nan = x.isnan()
    same = got.view(torch.int16) == want.view(torch.int16)
    return int((~same & ~nan).sum()) + int((~got[nan].isnan()).sum())


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_bits_match_torch_for_every_class(dtype):
    x = all_classes(dtype)
    assert mismatches(hardneg_round(x, dtype), x, dtype) == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_the_inputs_hold_every_class(dtype):
    """The sets above contain what they claim: exact ties broken both ways, values that overflow
    to inf and ones that round to 0, subnormal results, NaNs."""
    x = all_classes(dtype)
    want = x.to(dtype)
    finite = want.isfinite() & (x != want.float())
    r, xf = want[finite], x[finite].double()
    other = step_magnitude(r, xf.abs() > r.double().abs()).double()  # the other candidate
    tie = (xf - r.double()).abs() == (other - xf).abs()
    assert int(tie.sum()) > 60_000  # both ways: to the larger and to the smaller magnitude
    assert bool((r.double().abs()[tie] > xf.abs()[tie]).any())
    assert bool((r.double().abs()[tie] < xf.abs()[tie]).any())
    assert bool((want.isinf() & x.isfinite()).any())
    assert bool(((want == 0) & (x != 0)).any())
    tiny = torch.finfo(dtype).tiny
    assert bool(((want.float().abs() < tiny) & (want != 0)).any())
    assert int(x.isnan().sum()) >= 12


def round_truncating(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A wrong rounding: the dropped bits cut off (toward zero). x finite."""
    rn = x.to(dtype)
    too_big = rn.double().abs() > x.double().abs()
    return torch.where(too_big, step_magnitude(rn, torch.zeros_like(too_big)), rn)


def round_half_away(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Another wrong rounding: ties away from zero instead of to even (bf16)."""
    bits = fp32_bits(x)
    out = ((bits + 0x8000) >> 16).to(torch.int32).to(torch.int16)
    return out.view(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_wrong_rounding_is_caught(dtype):
    x = all_classes(dtype)
    x = x[x.isfinite()]
    assert mismatches(round_truncating(x, dtype), x, dtype) > 1000
    if dtype == torch.bfloat16:
        assert mismatches(round_half_away(x, dtype), x, dtype) > 1000


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("n", [1, 3, 15, 16, 17, 100_003])
def test_vector_body_and_tail_agree(dtype, n):
    """The same value gives the same bits at every position of the loop."""
    x = random_bits(n, n)
    bulk = hardneg_round(x, dtype)
    one_by_one = torch.cat([hardneg_round(x[i : i + 1], dtype) for i in range(min(n, 64))])
    assert torch.equal(bulk[: len(one_by_one)].view(torch.int16), one_by_one.view(torch.int16))
    shifted = hardneg_round(torch.cat([x[:1], x]), dtype)[1:]
    assert torch.equal(bulk.view(torch.int16), shifted.view(torch.int16))


def test_unknown_dtype_code_is_refused():
    x = torch.zeros(4)
    y = torch.empty(4)
    with pytest.raises(ValueError, match="unknown dS dtype code 7"):
        _C.hardneg_round(x.data_ptr(), y.data_ptr(), 4, 7)
