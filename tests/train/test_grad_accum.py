"""train.grad_accum_steps = A: one update from A micro-batches whose gradient is the mean of the
micro-batch losses' gradients, exactly, under one process, DDP and DeepSpeed ZeRO-2.

Gradients are captured right before the optimizer step (after the engine's reduction): Adam's
first updates are ~lr * sign(g), which would hide a wrong 1/A or K scale. Under ZeRO-2 the
gradient is partitioned, so its global norm (DeepSpeed's, before clipping) is compared instead,
with the weights after two steps for the direction.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _launch import spawn

REPO = Path(__file__).resolve().parents[2]
B = 4  # per rank
LR = 1e-3


def _overrides(root, out, *, batch: int, accum: int, steps: int) -> list[str]:
    return [
        "--data.root", str(root),
        "--data.num_hard_negatives", "1",
        "--train.output_dir", str(out),
        "--train.batch_size", str(batch),
        "--train.gradcache_chunk_size", "3",
        "--train.grad_accum_steps", str(accum),
        "--train.max_steps", str(steps),
        "--train.lr", str(LR),
        "--train.precision", "fp32",
        "--train.progress_bar", "false",
        "--checkpoint.every_steps", "0",
    ]  # fmt: skip


def _run(overrides, *, update: bool = True):
    """Fit; returns (gradients before each step, grad norms, final weights)."""
    from hardneg.train.config import load_config
    from hardneg.train.engine import unwrap
    from hardneg.train.trainer import Trainer

    trainer = Trainer(load_config(None, overrides))
    engine, grads, norms = trainer.engine, [], []
    step = engine.step

    def capture_then_step():
        named = unwrap(engine.model).named_parameters()
        grads.append({n: p.grad.detach().clone() for n, p in named if p.grad is not None})
        if update:
            step()
        else:
            engine.optimizer.zero_grad(set_to_none=True)
        if engine.is_deepspeed:
            norms.append(float(engine.model.get_global_grad_norm()))

    engine.step = capture_then_step
    trainer.fit()
    weights = {k: v.detach().clone() for k, v in unwrap(engine.model).state_dict().items()}
    return grads, norms, weights


def _norm(grads: dict) -> float:
    return float(torch.sqrt(sum(g.double().square().sum() for g in grads.values())))


def _assert_close(got: dict, ref: dict, atol: float) -> None:
    assert set(got) == set(ref) and len(ref) > 10
    for name in ref:
        scale = ref[name].abs().max().clamp_min(1e-12)
        torch.testing.assert_close(got[name] / scale, ref[name] / scale, rtol=0, atol=atol)


def test_update_follows_the_mean_of_the_micro_batch_gradients(mmeb_train_dir, tmp_path):
    accum, _, _ = _run(_overrides(mmeb_train_dir, tmp_path / "a", batch=B, accum=2, steps=1))
    # The same two micro-batches as two steps that do not update: each one's gradient alone.
    each, _, _ = _run(
        _overrides(mmeb_train_dir, tmp_path / "b", batch=B, accum=1, steps=2), update=False
    )
    mean = {n: (each[0][n] + each[1][n]) / 2 for n in each[0]}
    # g1/2 + g2/2 accumulated vs (g1 + g2)/2: fp32 rounding of the last bits.
    _assert_close(accum[0], mean, atol=1e-6)
    # The comparison can fail: the first micro-batch alone, or the sum, is far off.
    worst_first = max((accum[0][n] - each[0][n]).abs().max() / mean[n].abs().max() for n in mean)
    assert worst_first > 1e-2
    assert _norm(accum[0]) == pytest.approx(_norm(mean), rel=1e-5)
    assert _norm({n: each[0][n] + each[1][n] for n in mean}) > 1.5 * _norm(mean)


def _worker(rank: int, root: str, tmp: str, out: str) -> None:
    common = _overrides(root, Path(tmp) / "run", batch=B, accum=2, steps=2)
    ddp_grads, _, ddp_weights = _run(common)
    zero2 = [
        "--train.engine", "deepspeed",
        "--train.deepspeed_config", str(REPO / "recipes/deepspeed/zero2.json"),
    ]  # fmt: skip
    _, zero2_norms, zero2_weights = _run([*common, *zero2])
    if rank == 0:
        torch.save(
            {
                "ddp_grads": ddp_grads[0],
                "ddp_weights": ddp_weights,
                "zero2_norm": zero2_norms[0],
                "zero2_weights": zero2_weights,
            },
            out,
        )


@pytest.mark.slow
def test_two_ranks_accumulate_like_one_process(mmeb_train_dir, tmp_path):
    """2 ranks x batch B x 2 micro-batches (DDP, then ZeRO-2) against one process with batch 2B x
    2 micro-batches: rank r's micro-batch is slice r of the global one, so both see the same
    global micro-batches in the same order."""
    ref_grads, _, ref_weights = _run(
        _overrides(mmeb_train_dir, tmp_path / "one", batch=2 * B, accum=2, steps=2)
    )
    out = tmp_path / "two.pt"
    spawn(_worker, 2, str(mmeb_train_dir), str(tmp_path), str(out))
    got = torch.load(out)
    # fp32, different reduction orders (chunked GEMMs, gloo sum): 1e-4 of each tensor's largest.
    _assert_close(got["ddp_grads"], ref_grads[0], atol=1e-4)
    assert got["zero2_norm"] == pytest.approx(_norm(ref_grads[0]), rel=1e-4)
    for name in ("ddp_weights", "zero2_weights"):
        worst = max((got[name][k] - ref_weights[k]).abs().max().item() for k in ref_weights)
        # Adam moves each weight by about lr per step: allow 5% of one step of fp32 noise.
        assert worst < 0.05 * LR, (name, worst)
    print(json.dumps({"zero2_norm": got["zero2_norm"], "one_process": _norm(ref_grads[0])}))
