"""hardneg_expf_cpu, the vectorisable exp of the CPU kernels (csrc/include/hardneg/
hardneg_loss_math.h), against torch.exp in fp64 (the exact value for fp32 arguments, to ~1e-16
relative).

Claims under test: error about 1 ulp of the exact exp for x >= -87.3 (1.02 ulp measured over the
5M points here, bound 1.5; torch.exp's own is 0.56: a polynomial evaluated in fp32 without extra
precision cannot promise correct rounding), exactly 0 below
(results there are under 1.22e-38), +inf from the overflow threshold ln(FLT_MAX) = 88.7228 on, the
IEEE special values kept, and the same bits from the vector loop body and its scalar tail.
These run the ISA variant chosen for this machine; tests/test_cpu_isa.py checks the error bound,
the special values and the tail under every variant the machine runs.
"""

from __future__ import annotations

import math

import pytest
import torch
from hardneg import _C

FLT_MAX_LOG = math.log(torch.finfo(torch.float32).max)  # 88.72284
FLUSH_BELOW = -87.3


def hardneg_exp(x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    y = torch.empty_like(x)
    _C.hardneg_exp(x.data_ptr(), y.data_ptr(), x.numel())
    return y


def ulp_error(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """|y - exp(x)| in units of the fp32 spacing at exp(x) (x, y fp32; exp(x) a normal float)."""
    exact = torch.exp(x.double())
    rounded = exact.float()
    spacing = (torch.nextafter(rounded, torch.tensor(math.inf)) - rounded).double()
    return (y.double() - exact).abs() / spacing


def dense_grid() -> torch.Tensor:
    """4M evenly spaced points over the normal-result range plus 1M random ones near 0, where the
    reduction's remainder r is the argument itself."""
    g = torch.Generator().manual_seed(0)
    grid = torch.linspace(FLUSH_BELOW, 88.72, 4_000_000)
    near0 = (torch.rand(1_000_000, generator=g) - 0.5) * 2.0
    return torch.cat([grid, near0])


def test_error_below_one_ulp():
    x = dense_grid()
    err = ulp_error(hardneg_exp(x), x)
    torch_err = ulp_error(torch.exp(x), x)
    assert err.max().item() < 1.5, f"max error {err.max().item():.3f} ulp"
    # Sanity of the yardstick: torch.exp, a libm-grade exp, is within it too.
    assert torch_err.max().item() < 1.0


def test_ulp_check_can_fail():
    """A relative perturbation of 2^-22 (2 to 4 ulp) is caught."""
    x = dense_grid()[::7]
    wrong = hardneg_exp(x) * (1 + 2.0**-22)
    assert ulp_error(wrong, x).max().item() > 1.5


def test_special_values():
    x = torch.tensor([-math.inf, math.inf, math.nan, 0.0, -0.0, 1.0, -1.0, 88.72, 88.7229, 89.0])
    y = hardneg_exp(x)
    want = torch.exp(x)
    assert y[0] == 0.0 and y[1] == math.inf and math.isnan(y[2])
    assert y[3] == 1.0 and y[4] == 1.0
    torch.testing.assert_close(y[5:8], want[5:8], rtol=2 * 2.0**-24, atol=0)
    assert math.isfinite(y[7]) and y[8] == math.inf and y[9] == math.inf


def test_overflow_threshold():
    """Finite up to the last float below ln(FLT_MAX), +inf from the first one above it."""
    below = torch.nextafter(torch.tensor(FLT_MAX_LOG, dtype=torch.float32), torch.tensor(0.0))
    above = torch.nextafter(torch.tensor(FLT_MAX_LOG, dtype=torch.float32), torch.tensor(100.0))
    probe = torch.stack([below - 1e-4, below, above, above + 1e-4])
    y = hardneg_exp(probe)
    want = torch.exp(probe.double())
    finite = want < torch.finfo(torch.float32).max
    assert torch.isfinite(y[finite]).all() and torch.isinf(y[~finite]).all()


def test_flush_below_threshold_is_tiny():
    """Below -87.3 the result is exactly 0, an absolute error under e^-87.3 = 1.22e-38."""
    x = torch.linspace(-110.0, FLUSH_BELOW, 100_001)[:-1]
    y = hardneg_exp(x)
    assert (y == 0).all()
    assert torch.exp(x.double()).max().item() < 1.23e-38
    # Just above the threshold results are normal floats, never subnormal.
    y_above = hardneg_exp(torch.linspace(FLUSH_BELOW, -87.0, 10_001))
    assert (y_above >= torch.finfo(torch.float32).tiny).all()


@pytest.mark.parametrize("n", [1, 3, 15, 16, 17, 1000, 100_003])
def test_vector_body_and_tail_agree(n):
    """The same argument gives the same bits at every position of the loop (SIMD body, masked or
    scalar tail) and in a call of length 1."""
    g = torch.Generator().manual_seed(n)
    x = (torch.rand(n, generator=g) - 0.5) * 200.0
    bulk = hardneg_exp(x)
    one_by_one = torch.cat([hardneg_exp(x[i : i + 1]) for i in range(min(n, 64))])
    assert torch.equal(bulk[: len(one_by_one)], one_by_one)
    shifted = hardneg_exp(torch.cat([x[:1], x]))[1:]  # every element moves one lane
    assert torch.equal(bulk, shifted)
