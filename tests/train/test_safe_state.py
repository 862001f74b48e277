"""Checkpoint files hold only tensors and plain data: exact round trips of optimizer, scheduler and
RNG state through safetensors + JSON, and pickles refused with an error naming the file (ours and
DeepSpeed's)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hardneg.train.checkpoint import capture_rng, load_rng, restore_rng, save_rng
from hardneg.train.safe_state import CheckpointError, load_state, save_state
from transformers import get_cosine_schedule_with_warmup


class Payload:
    """Unpickling it runs code: it creates the file named at pickling time."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _trained_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), weight_decay=0.01)
    sched = get_cosine_schedule_with_warmup(opt, 2, 10)
    for _ in range(3):
        model(torch.randn(4, 7)).square().sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt, sched


def _assert_same(a, b, where="state"):
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and a != a:
        assert b != b, where
    else:
        assert a == b, where


def test_optimizer_and_scheduler_round_trip_exactly(tmp_path):
    _, opt, sched = _trained_optimizer()
    for name, state in (("optimizer", opt.state_dict()), ("scheduler", sched.state_dict())):
        files = save_state(state, tmp_path / name)
        assert [f.name for f in files] == [f"{name}.safetensors", f"{name}.json"]
        _assert_same(state, load_state(tmp_path / name), name)

    # The restored optimizer continues exactly like the original.
    model_a, opt_a, sched_a = _trained_optimizer()
    model_b, opt_b, sched_b = _trained_optimizer()
    opt_b.load_state_dict(load_state(tmp_path / "optimizer"))
    sched_b.load_state_dict(load_state(tmp_path / "scheduler"))
    x = torch.randn(4, 7)
    for model, o, s in ((model_a, opt_a, sched_a), (model_b, opt_b, sched_b)):
        model(x).square().sum().backward()
        o.step()
        s.step()
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_plain_data_keeps_its_types(tmp_path):
    state = {
        3: {"step": torch.tensor(4.0), "ids": torch.arange(5, dtype=torch.int64)},
        "tuple": (1, (2.5, None), [True, "x"]),
        "floats": [float("nan"), float("inf"), -0.0, 0.1 + 0.2],
        "__tensor__": "a key that looks like a marker",
        "array": np.arange(6, dtype=np.uint32).reshape(2, 3),
        "empty": {},
    }
    save_state(state, tmp_path / "s")
    _assert_same(state, load_state(tmp_path / "s"))


def test_rng_round_trip_through_files(tmp_path):
    save_rng(tmp_path)
    a = (random.random(), np.random.rand(), torch.rand(3))
    load_rng(tmp_path)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])
    _assert_same(capture_rng()["python"], capture_rng()["python"])
    restore_rng(capture_rng())


def test_objects_are_not_saved(tmp_path):
    with pytest.raises(TypeError, match=r"opt\['state'\]\[0\]\['fn'\] is a function"):
        save_state({"state": {0: {"fn": lambda: 1}}}, tmp_path / "opt")


def test_a_pickle_in_place_of_a_state_file_is_refused(tmp_path):
    _, opt, _ = _trained_optimizer()
    save_state(opt.state_dict(), tmp_path / "optimizer")
    marker = tmp_path / "code-ran"
    torch.save({"state": Payload(marker)}, tmp_path / "optimizer.safetensors")
    with pytest.raises(CheckpointError, match=r"optimizer\.safetensors is not a safetensors file"):
        load_state(tmp_path / "optimizer")
    assert not marker.exists()


def test_an_older_pickled_checkpoint_is_not_loaded(tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"python": Payload(marker)}, tmp_path / "rng_rank0.pt")
    with pytest.raises(CheckpointError, match=r"rng_rank0\.safetensors is missing; .*rng_rank0\.pt "
                       r"is a pickle .* not loaded"):  # fmt: skip
        load_rng(tmp_path)
    assert not marker.exists()


def test_malformed_json_names_the_file(tmp_path):
    save_state({"a": torch.ones(2)}, tmp_path / "s")
    (tmp_path / "s.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"s\.json is not JSON"):
        load_state(tmp_path / "s")


def test_deepspeed_files_are_read_weights_only(tmp_path):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from hardneg.train.deepspeed_checkpoint import load_weights_only

    # What ZeRO-2 optimizer files hold: tensors, plain data, a loss scaler, the stage enum.
    plain = {
        "optimizer_state_dict": {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum(2)},
        "single_partition_of_fp32_groups": [torch.randn(5)],
        "ds_version": "0.19",
    }
    torch.save(plain, tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    got = load_weights_only(tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert got["optimizer_state_dict"]["zero_stage"] == ZeroStageEnum(2)
    assert torch.equal(got["single_partition_of_fp32_groups"][0],
                       plain["single_partition_of_fp32_groups"][0])  # fmt: skip

    marker = tmp_path / "code-ran"
    torch.save({"module": Payload(marker)}, tmp_path / "mp_rank_00_model_states.pt")
    with pytest.raises(
        CheckpointError, match=r"mp_rank_00_model_states\.pt holds a pickled object"
    ):
        load_weights_only(tmp_path / "mp_rank_00_model_states.pt")
    assert not marker.exists()
