"""Typed training configuration: YAML file + dotted command-line overrides -> dataclasses.

A run is described by one `RunConfig`. It is read from YAML (`load_config`), every string value may
reference environment variables as ``${NAME}`` or ``${NAME:-default}`` (so model ids and data roots
stay out of the files), and `--section.key value` overrides are applied on top. Every key and every
value is checked against the dataclass annotations: an unknown key or a value of the wrong type
raises ConfigError naming the dotted key and the value. The resolved config is written to the
output directory with every run (`save_config`), so a run can be repeated from its own folder.

Relative paths are relative to the directory the command runs in (the repository root in the
documented commands).
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hardneg._constants import ALPHA, EGA_BETA, EGA_MARGIN, MODES, TEMPERATURE


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the dotted key and the value."""


@dataclass
class LoraConfig:
    # Off in the LLaVE recipe (full fine-tune of projector + LLM); on for small-GPU runs.
    enabled: bool = False
    # Rank and scale of the adapters: 16/32 is peft's common starting point for 0.5B-7B LLMs.
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # The language model's attention and MLP projections; the vision tower stays frozen anyway.
    target_modules: list[str] = field(
        default_factory=lambda: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
    )


@dataclass
class ModelConfig:
    # "tiny" builds hardneg.models.Embedder.tiny(seed=tiny_seed) offline; anything else is a local
    # path or model id handed to Embedder.from_pretrained (use ${MODEL} to keep paths out of files).
    name_or_path: str = "tiny"
    tiny_seed: int = 0
    # Weights' dtype at load. float32 for DDP (bf16 autocast computes, AdamW updates fp32 master
    # weights); bfloat16 under DeepSpeed bf16, which keeps its own fp32 master copy, halves the
    # memory of loading a 7B model.
    dtype: str = "float32"
    # LLaVE freezes the vision encoder (+0.8 MMEB in its ablation) and trains projector + LLM.
    freeze_vision_tower: bool = True
    # Trades ~30% more compute for activations that no longer grow with depth (LLaVE used it).
    gradient_checkpointing: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class SyntheticConfig:
    # Generate the compositional synthetic set into data.root's parent when it is absent, so the
    # CPU demo needs no download.
    generate_if_missing: bool = False
    # Number of generated training pairs (the eval split is sized by the generator).
    n: int = 2000


@dataclass
class DataConfig:
    # MMEB-train root (one parquet per subset); ${MMEB_TRAIN} in the real-model configs.
    root: str = "data/synthetic/train"
    # Subsets to read; empty means every subset found under root.
    subsets: list[str] = field(default_factory=list)
    # Rows kept per subset (LLaVE: 50K each -> 662K pairs); 0 keeps all.
    cap_per_subset: int = 0
    # Relative sampling weight per subset name (missing names weigh 1).
    weights: dict[str, float] = field(default_factory=dict)
    # Where the image paths of the parquet rows are rooted; empty means root.
    image_root: str = ""
    # "error" stops on a missing image (naming the file); "skip" drops such rows with a warning.
    on_missing_image: str = "error"
    # Every global batch from one subset (VLM2Vec's "same source" batches): in-batch negatives
    # then share the query's task. Off in LLaVE (mixed batches).
    same_subset: bool = False
    # Explicit hard negatives per query taken from the rows' neg_text / neg_image_path.
    num_negatives: int = 0
    # DataLoader worker processes per rank (image decode + processor); 0 runs them inline.
    num_workers: int = 0
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class LossConfig:
    # "llave" (hardness-weighted), "infonce", or "ega" (gradient amplifier reconstruction).
    mode: str = "llave"
    # LLaVE: temperature 0.02 (logit scale 50), alpha 9; EGA's beta and margin are the defaults
    # the synthetic ablation chose (hardneg._constants, one place for op, reference and recipes).
    temperature: float = TEMPERATURE
    alpha: float = ALPHA
    ega_beta: float = EGA_BETA
    ega_margin: float = EGA_MARGIN
    # LLaVE's code averages the query->target and target->query directions.
    symmetric: bool = True
    # Gather negatives from every rank (LLaVE: +4.5 MMEB in its ablation); false keeps each rank's
    # loss local (then every rank sees only its own batch as negatives).
    cross_device: bool = True


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    seed: int = 0
    # "ddp" (torch DistributedDataParallel, or a plain module on one process) or "deepspeed".
    engine: str = "ddp"
    # ZeRO config for engine "deepspeed"; its "auto" entries are filled from this config.
    deepspeed_config: str = "recipes/deepspeed/zero3.json"
    # Queries per rank per optimizer step (each contributes 1 target + num_negatives negatives).
    batch_size: int = 32
    # Rows per GradCache chunk; 0 disables GradCache (one forward/backward of the whole batch).
    gradcache_chunk_size: int = 0
    epochs: int = 1
    # Stop after this many optimizer steps (0: run the full epochs); the schedule follows it.
    max_steps: int = 0
    # LLaVE: AdamW, lr 1e-5 (0.5B, 2B) / 5e-6 (7B), weight decay 0, cosine with 3% warmup.
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    max_grad_norm: float = 1.0
    # "bf16": autocast the model in bfloat16 (the loss stays fp32); "fp32": no autocast.
    precision: str = "bf16"
    # "auto": nccl when CUDA is available, gloo otherwise.
    backend: str = "auto"
    log_every: int = 10
    # Progress bar on rank 0 (off for tests and logs captured to files).
    progress_bar: bool = True


@dataclass
class CheckpointConfig:
    # Save every N optimizer steps (0: only the final export).
    every_steps: int = 500
    # Checkpoints kept on disk; older ones are deleted once a newer one is complete.
    keep_last: int = 2


@dataclass
class EvalConfig:
    # Retrieval P@1 on an MMEB-eval style folder after training (skipped when root is empty).
    root: str = ""
    # Datasets (sub-folders of root) to score; empty means every one found.
    datasets: list[str] = field(default_factory=list)
    batch_size: int = 64


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


_CHOICES = {
    "model.dtype": ("float32", "bfloat16"),
    "loss.mode": MODES,
    "train.engine": ("ddp", "deepspeed"),
    "train.precision": ("bf16", "fp32"),
    "train.backend": ("auto", "gloo", "nccl"),
    "data.on_missing_image": ("error", "skip"),
}
_POSITIVE = ("train.batch_size", "loss.temperature", "train.lr", "checkpoint.keep_last")
_NON_NEGATIVE = (
    "train.gradcache_chunk_size",
    "train.max_steps",
    "train.epochs",
    "train.weight_decay",
    "train.warmup_ratio",
    "train.max_grad_norm",
    "data.num_negatives",
    "data.num_workers",
    "data.cap_per_subset",
    "checkpoint.every_steps",
)


# ---------------------------------------------------------------------------------------------
# Type checking of one value against an annotation
# ---------------------------------------------------------------------------------------------


def _check_value(key: str, value: Any, tp: Any) -> Any:
    """Return value converted to tp (int -> float only) or raise ConfigError naming key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return _check_value(key, value, arm)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} matches none of {tp}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r} ({type(value).__name__})")
        (arm,) = typing.get_args(tp)
        return [_check_value(f"{key}[{i}]", v, arm) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r} ({type(value).__name__})")
        k_tp, v_tp = typing.get_args(tp)
        return {
            _check_value(f"{key} key", k, k_tp): _check_value(f"{key}.{k}", v, v_tp)
            for k, v in value.items()
        }
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be a bool, got {value!r} ({type(value).__name__})")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an int, got {value!r} ({type(value).__name__})")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a float, got {value!r} ({type(value).__name__})")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r} ({type(value).__name__})")
        return value
    raise AssertionError(f"unsupported annotation {tp} for {key}")


def _fields(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _build(cls, data: dict, prefix: str):
    """Instantiate dataclass cls from a (possibly partial) mapping, checking every key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {data!r}")
    hints = _fields(cls)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise ConfigError(
            f"unknown config key {key!r} (known under {prefix or '.'}: {sorted(hints)})"
        )
    kwargs = {}
    for name, tp in hints.items():
        if name not in data:
            continue
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data[name] or {}, f"{key}.")
        else:
            kwargs[name] = _check_value(key, data[name], tp)
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# Environment substitution and overrides
# ---------------------------------------------------------------------------------------------

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(value: Any, key: str) -> Any:
    if isinstance(value, dict):
        return {k: _expand_env(v, f"{key}.{k}" if key else k) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, f"{key}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise ConfigError(
            f"{key} = {value!r} needs environment variable {name} (set it, or override {key})"
        )

    return _ENV_RE.sub(sub, value)


def parse_overrides(args: list[str]) -> dict:
    """["--train.lr", "1e-5", "--loss.symmetric=false"] -> {"train": {"lr": 1e-5}, ...}.

    Values are parsed as YAML scalars/flow collections (1e-5 -> float, [a, b] -> list)."""
    nested: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"override {arg!r} must look like --section.key VALUE")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override {arg!r} has no value")
            key, raw = arg[2:], args[i + 1]
            i += 2
        value = _yaml_scalar(raw)
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r} conflicts with an earlier override")
        node[parts[-1]] = value
    return nested


def _yaml_scalar(raw: str) -> Any:
    # YAML 1.1 reads "1e-5" as a string (it wants "1.0e-5"); accept what people type.
    try:
        return (
            float(raw)
            if re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", raw)
            else yaml.safe_load(raw)
        )
    except yaml.YAMLError:
        return raw


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _fix_yaml_floats(value: Any) -> Any:
    # Same YAML 1.1 quirk inside files: "lr: 1e-5" arrives as a string.
    if isinstance(value, dict):
        return {k: _fix_yaml_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_fix_yaml_floats(v) for v in value]
    if isinstance(value, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value):
        return float(value)
    return value


def _validate(cfg: RunConfig) -> None:
    flat = to_dict(cfg)
    for key, choices in _CHOICES.items():
        section, name = key.split(".")
        value = flat[section][name]
        if value not in choices:
            raise ConfigError(f"{key} must be one of {choices}, got {value!r}")
    for key in _POSITIVE + _NON_NEGATIVE:
        section, name = key.split(".")
        value = flat[section][name]
        if key in _POSITIVE and not value > 0:
            raise ConfigError(f"{key} must be > 0, got {value!r}")
        if key in _NON_NEGATIVE and value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value!r}")
    if len(cfg.train.adam_betas) != 2:
        raise ConfigError(f"train.adam_betas must hold 2 floats, got {cfg.train.adam_betas!r}")
    if cfg.train.epochs == 0 and cfg.train.max_steps == 0:
        raise ConfigError("train.epochs and train.max_steps are both 0: nothing to train")


def load_config(path: str | os.PathLike | None, overrides: list[str] | dict | None = None):
    """Read a YAML config (None: all defaults), apply overrides, check it; returns RunConfig."""
    raw: dict = {}
    if path is not None:
        text = Path(path).read_text()
        raw = yaml.safe_load(text) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    if overrides:
        extra = overrides if isinstance(overrides, dict) else parse_overrides(list(overrides))
        raw = _merge(raw, extra)
    cfg = _build(RunConfig, _expand_env(_fix_yaml_floats(raw), ""), "")
    _validate(cfg)
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    """Write the resolved config (environment variables expanded, overrides applied) as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
