"""benchmarks/bench_hardness.py: its losses against the reference, its world, and proof that the
instrument separates a working loss from broken ones at a fixed seed (one core, well under 60 s)."""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hardneg  # noqa: E402
from hardneg.reference import hardneg_loss_reference  # noqa: E402

from benchmarks import bench_hardness as bench  # noqa: E402
from benchmarks import hardness_report  # noqa: E402
from benchmarks.hardness_losses import ega_pbar, ega_surrogate_loss  # noqa: E402
from benchmarks.hardness_task import RunConfig, World, WorldConfig, train  # noqa: E402

TAU = 0.1


def _inputs(dtype=torch.float64, B=7, M=2, D=5):
    """Awkward sizes, a duplicated target id (masked both ways) and a hard negative carrying a
    positive's id (masked)."""
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(B, D, generator=g, dtype=dtype), dim=1).requires_grad_()
    t = F.normalize(torch.randn(B, D, generator=g, dtype=dtype), dim=1).requires_grad_()
    h = F.normalize(torch.randn(B, M, D, generator=g, dtype=dtype), dim=-1).requires_grad_()
    ids = torch.tensor([0, 1, 2, 1, 4, 5, 6])
    h_ids = torch.arange(100, 100 + B * M).view(B, M)
    h_ids[2, 0] = 0
    return q, t, h, {"hard_negatives": h, "target_ids": ids, "hard_negative_ids": h_ids}


def _value_and_grads(fn, q, t, h):
    loss = fn()
    return loss.detach(), torch.autograd.grad(loss, (q, t, h))


def _close(a, b, tol):
    """Values and gradients within tol relative to each tensor's largest entry."""
    return (a[0] - b[0]).abs().item() <= tol * b[0].abs().item() and all(
        (x - y).abs().max() <= tol * y.abs().max() for x, y in zip(a[1], b[1], strict=True)
    )


@pytest.mark.parametrize("beta,margin", [(2.0, 0.0), (50.0, 0.3)])
def test_ega_variant_b_is_the_kernels_reconstruction(beta, margin):
    """mode="ega" (the reference and the fused op) is variant b, the row-renormalised Pbar."""
    q, t, h, kw = _inputs()

    def surrogate(normalise, b=beta, m=margin):
        return _value_and_grads(
            lambda: ega_surrogate_loss(
                q, t, temperature=TAU, beta=b, margin=m, normalise=normalise, **kw
            ),
            q,
            t,
            h,
        )

    ours = surrogate("row")
    ref = _value_and_grads(
        lambda: hardneg_loss_reference(
            q,
            t,
            mode="ega",
            temperature=TAU,
            ega_beta=beta,
            ega_margin=margin,
            symmetric=True,
            **kw,
        ),
        q,
        t,
        h,
    )
    assert _close(ours, ref, 1e-10)
    # The fused op in fp32: 1e-5 of the largest entry is ~100 fp32 ulps (the amplified logits
    # z + u reach 1 / tau + beta * (2 + margin), so the tolerance is relative).
    q32, t32, h32 = (x.detach().float().requires_grad_() for x in (q, t, h))
    kw32 = {**kw, "hard_negatives": h32}
    fused = _value_and_grads(
        lambda: hardneg.fused_hardneg_loss(
            q32,
            t32,
            mode="ega",
            temperature=TAU,
            ega_beta=beta,
            ega_margin=margin,
            symmetric=True,
            **kw32,
        ),
        q32,
        t32,
        h32,
    )
    assert _close(tuple([fused[0].double(), [g.double() for g in fused[1]]]), ref, 1e-5)
    # ... and the comparison can fail: another beta, or the old unnormalised form, is caught.
    assert not _close(surrogate("row", beta + 1, margin + 0.5), ref, 1e-6)
    assert not _close(surrogate("none"), ref, 1e-6)


def test_ega_variant_b_is_a_weighted_softmax():
    """Row renormalisation: the gradient of cross-entropy over logits z_ij + u_ij (u held
    constant), u_ij = beta * max(0, s_ij - s_ip + margin) on negatives; value InfoNCE's."""
    beta, margin = 20.0, 0.3
    q, t, h, kw = _inputs()
    ours = _value_and_grads(
        lambda: ega_surrogate_loss(q, t, temperature=TAU, beta=beta, margin=margin, **kw), q, t, h
    )

    def direct():
        cands = torch.cat([t, h.flatten(0, 1)])
        cand_ids = torch.cat([kw["target_ids"], kw["hard_negative_ids"].flatten()])
        ids = kw["target_ids"]
        total = 0
        for rows, cols, col_ids in ((q, cands, cand_ids), (t, q, ids)):
            s = rows @ cols.T
            n = rows.shape[0]
            pos = torch.zeros_like(s, dtype=torch.bool)
            pos[:, :n] = torch.eye(n, dtype=torch.bool)
            u = (beta * (s - s.diagonal()[:, None] + margin).clamp_min(0)).masked_fill(pos, 0)
            z = (s / TAU).masked_fill((col_ids[None] == ids[:, None]) & ~pos, float("-inf"))
            weighted = torch.logsumexp(z + u.detach(), 1) - z.diagonal()
            plain = torch.logsumexp(z, 1) - z.diagonal()
            total = total + (plain.detach() + weighted - weighted.detach()).mean() / 2
        return total

    assert _close(ours, _value_and_grads(direct, q, t, h), 1e-10)
    infonce = hardneg_loss_reference(q, t, mode="infonce", temperature=TAU, symmetric=True, **kw)
    assert abs(ours[0] - infonce.detach()) < 1e-12


def test_ega_pbar_normalisations():
    s = torch.tensor([[0.5, 0.6, 0.2, 0.45], [0.1, 0.3, 0.35, -0.2]], dtype=torch.float64)
    no_mask = torch.zeros_like(s, dtype=torch.bool)
    kw = {"temperature": TAU, "beta": 5.0, "margin": 0.1}
    p = torch.softmax(s / TAU, dim=1)
    a = ega_pbar(s, no_mask, normalise="none", **kw)
    assert (a.sum(1) > 1).all()  # the net push of the unnormalised form
    for normalise in ("row", "negatives"):
        assert torch.allclose(ega_pbar(s, no_mask, normalise=normalise, **kw).sum(1), s.new_ones(2))
    c = ega_pbar(s, no_mask, normalise="negatives", **kw)
    assert torch.allclose(c.diagonal(), p.diagonal())  # the positive's pull is InfoNCE's
    easy = ega_pbar(s, no_mask, normalise="row", **kw)[0, 2] / p[0, 2]
    assert easy < 1  # an easy negative (0.2 < 0.5 - 0.1) loses weight after renormalisation
    with pytest.raises(ValueError, match="normalise must be one of"):
        ega_pbar(s, no_mask, normalise="sum", **kw)


def test_world_splits_and_mining():
    world = World(WorldConfig(), seed=3)
    assert set(world.test_ids.tolist()).isdisjoint(world.train_ids.tolist())
    vals = world.values
    diff = (vals[world.hard_split[:, 1:]] != vals[world.hard_split[:, :1]]).sum(-1)
    assert (diff == 1).all() and world.hard_split.shape[1] == 1 + 4 * 7
    assert (world.random_split[:, 1:] != world.random_split[:, :1]).all()
    mined = world.mined[world.train_ids]
    assert (mined != world.train_ids[:, None]).all()
    assert torch.isin(mined, world.train_ids).all()


def test_train_is_deterministic_and_checks_groups():
    world = World(WorldConfig(), seed=0)
    loss = bench.make_loss(bench.arm("t", "llave", "llave", alpha=9.0))
    run = RunConfig(items_per_step=32, groups=2, hard_negatives=1, steps=5)
    assert train(world, loss, run, 1) == train(world, loss, run, 1)
    with pytest.raises(ValueError, match="not a multiple of groups 3"):
        train(world, loss, RunConfig(items_per_step=32, groups=3, steps=1), 0)


def test_paired_statistics_and_arms():
    d = hardness_report.paired([3.0, 5.0, 7.0], [1.0, 2.0, 3.0])  # differences 2, 3, 4
    assert d["mean"] == 3.0 and d["std"] == 1.0 and d["t"] == pytest.approx(3 * 3**0.5)
    assert d["beyond_noise"]  # t 5.2 > 4.30, the two-sided 5% point at 2 degrees of freedom
    assert not hardness_report.paired([3.0, 5.0, 9.0], [1.0, 2.0, 3.0])["beyond_noise"]  # t 3.05
    assert hardness_report.paired([2.0, 3.0, 4.0, 5.0, 6.0], [0.0] * 5)["beyond_noise"]
    arms = bench.build_arms(list(bench.SECTIONS))
    labels = [(a["section"], a["label"]) for a in arms]
    assert len(set(labels)) == len(labels)
    assert all(a["vs"] is None or (a["section"], a["vs"]) in labels for a in arms)
    with pytest.raises(ValueError, match="unknown loss"):
        bench.make_loss({**arms[0], "loss": "focal"})


def test_custom_arm_end_to_end(tmp_path):
    """--arm runs an arm and its infonce baseline, writes JSON, markdown and the plot."""
    argv = ["--sections", "", "--seeds", "0,1", "--out-dir", str(tmp_path)]
    argv += ["--arm", "loss=ega_b beta=50 margin=0.3 items_per_step=16 steps=3 noise=0.7"]
    json_path = bench.main(argv)
    record = json.loads(json_path.read_text())
    rows = {r["label"]: r for r in record["rows"]}
    assert set(rows) == {"infonce", argv[-1]}
    assert rows[argv[-1]]["arm"]["run"]["items_per_step"] == 16
    assert rows[argv[-1]]["arm"]["world"]["noise"] == 0.7
    assert len(rows[argv[-1]]["per_seed_p1_hard"]) == 2 and "diff_p1_hard" in rows[argv[-1]]
    assert json_path.with_suffix(".md").exists() and json_path.with_suffix(".png").exists()
    with pytest.raises(ValueError, match="unknown keys"):
        bench.custom_arms(["loss=llave colour=red"])


def test_instrument_separates_working_from_broken_losses():
    """At one seed and 300 steps, llave must beat its broken forms by far and beat infonce at the
    poor temperature 0.02 (measured: see the asserted margins)."""
    torch.set_num_threads(1)
    world = World(bench.WORLD, seed=0)
    run = RunConfig(items_per_step=128, steps=300)

    def p1(loss, **params):
        return train(world, bench.make_loss(bench.arm("t", loss, loss, **params)), run, 0)

    llave = p1("llave", alpha=9.0)
    no_sg = p1("llave_nosg", alpha=9.0)
    flipped = p1("llave", alpha=-9.0)
    infonce = p1("infonce")
    assert llave["p1_hard"] > no_sg["p1_hard"] + 25
    assert no_sg["cos_pos"] < 0  # collapsed: queries pushed away from their positives
    assert llave["p1_hard"] > flipped["p1_hard"] + 20
    assert llave["p1_hard"] > infonce["p1_hard"] + 8


def test_chosen_ega_is_the_surrogate_default():
    """ega_surrogate_loss's defaults are the benchmark's recommended EGA, and so are hardneg's
    mode="ega" defaults (the op is variant b: test_ega_variant_b_is_the_kernels_reconstruction)."""
    assert (hardneg.EGA_BETA, hardneg.EGA_MARGIN) == (
        bench.EGA_CHOSEN["beta"],
        bench.EGA_CHOSEN["margin"],
    )
    params = inspect.signature(ega_surrogate_loss).parameters
    normalise, threshold = bench.EGA_VARIANTS[bench.EGA_CHOSEN["loss"].removeprefix("ega_")]
    assert (params["normalise"].default, params["threshold"].default) == (normalise, threshold)
    assert params["beta"].default == bench.EGA_CHOSEN["beta"]
    assert params["margin"].default == bench.EGA_CHOSEN["margin"]
