"""Typed training configuration: YAML file + dotted command-line overrides -> dataclasses.

A run is described by one `RunConfig`. It is read from YAML (`load_config`), every string value may
reference environment variables as ``${NAME}`` or ``${NAME:-default}`` (so model ids and data roots
stay out of the files), and `--section.key value` overrides are applied on top. Every key and every
value is checked against the dataclass annotations: an unknown key or a value of the wrong type
raises ConfigError naming the dotted key and the value (hardneg.train.typed_yaml does the checking;
this file holds the knobs and their meaning). The resolved config is written to the
output directory with every run (`save_config`), so a run can be repeated from its own folder.

Relative paths are relative to the directory the command runs in (the repository root in the
documented commands).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from hardneg._constants import ALPHA, EGA_BETA, EGA_MARGIN, MODES, TEMPERATURE
from hardneg.train.typed_yaml import (
    ConfigError,
    build,
    expand_env,
    fix_yaml_floats,
    merge,
    parse_overrides,
)


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
    # How texts are wrapped for embedding (hardneg.models.inputs): "hardneg" (no system turn, the
    # assistant turn's opening pooled) or "llave" (LLaVE's exact system + user + assistant prompt
    # and pooled token, as its released code embeds). Saved with the exported model.
    prompt_format: str = "hardneg"
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
    num_hard_negatives: int = 0
    # DataLoader worker processes per rank (image decode + processor); 0 runs them inline.
    num_workers: int = 0
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class LossConfig:
    # "llave" (hardness-weighted), "infonce", or "ega" (gradient amplifier reconstruction).
    mode: str = "llave"
    # LLaVE: temperature 0.02 (logit scale 50), alpha 9; EGA's beta and margin are the defaults
    # the controlled benchmark chose (hardneg._constants, one place for op, reference and recipes).
    temperature: float = TEMPERATURE
    alpha: float = ALPHA
    ega_beta: float = EGA_BETA
    ega_margin: float = EGA_MARGIN
    # LLaVE's code averages the query->target and target->query directions.
    symmetric: bool = True
    # Gather negatives from every rank (LLaVE: +4.5 MMEB in its ablation); false keeps each rank's
    # loss local (then every rank sees only its own batch as negatives).
    cross_device: bool = True
    # A candidate whose target id equals the positive's (the same target text/image repeated in a
    # batch, frequent in MMEB's classification subsets) is masked as a false negative. LLaVE
    # keeps such duplicates as negatives (its hardest, at alpha 9): false reproduces that.
    mask_duplicate_targets: bool = True


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    seed: int = 0
    # "ddp" (torch DistributedDataParallel, or a plain module on one process) or "deepspeed".
    engine: str = "ddp"
    # ZeRO config for engine "deepspeed"; its "auto" entries are filled from this config.
    deepspeed_config: str = "recipes/deepspeed/zero3.json"
    # Queries per rank per micro-batch (each brings 1 target + num_hard_negatives hard negatives).
    batch_size: int = 32
    # Rows per GradCache chunk; 0 disables GradCache (one forward/backward of the whole batch).
    gradcache_chunk_size: int = 0
    # Micro-batches of batch_size per optimizer step, each loss weighted 1/A (the update follows the
    # mean of their gradients). LLaVE: 8 steps of 32-pair losses; more negatives per loss come
    # from GradCache (a larger batch_size), not from accumulation.
    grad_accum_steps: int = 1
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
    # Folder the rows' image paths are relative to (MMEB-eval: its eval_images/); empty: root.
    image_root: str = ""
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
    "model.prompt_format": ("hardneg", "llave"),
    "loss.mode": MODES,
    "train.engine": ("ddp", "deepspeed"),
    "train.precision": ("bf16", "fp32"),
    "train.backend": ("auto", "gloo", "nccl"),
    "data.on_missing_image": ("error", "skip"),
}
_POSITIVE = (
    "train.batch_size",
    "train.grad_accum_steps",
    "loss.temperature",
    "train.lr",
    "checkpoint.keep_last",
)
# Strings that name something to read or write: empty is an error, not "unset".
_NON_EMPTY = ("model.name_or_path", "data.root", "train.output_dir")
_NON_NEGATIVE = (
    "train.gradcache_chunk_size",
    "train.max_steps",
    "train.epochs",
    "train.weight_decay",
    "train.warmup_ratio",
    "train.max_grad_norm",
    "data.num_hard_negatives",
    "data.num_workers",
    "data.cap_per_subset",
    "checkpoint.every_steps",
)


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
    for key in _NON_EMPTY:
        section, name = key.split(".")
        if not flat[section][name].strip():
            raise ConfigError(f"{key} must not be empty, got {flat[section][name]!r}")
    if cfg.train.engine == "deepspeed" and not cfg.train.deepspeed_config.strip():
        raise ConfigError(
            "train.deepspeed_config must name a JSON file when train.engine is deepspeed"
        )
    if len(cfg.train.adam_betas) != 2:
        raise ConfigError(f"train.adam_betas must hold 2 floats, got {cfg.train.adam_betas!r}")
    if cfg.train.epochs == 0 and cfg.train.max_steps == 0:
        raise ConfigError("train.epochs and train.max_steps are both 0: nothing to train")


def load_config(path: str | os.PathLike | None, overrides: list[str] | dict | None = None):
    """Read a YAML config (None: all defaults), apply overrides, check it; returns RunConfig."""
    raw: dict = {}
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"config file {str(path)!r} not found")
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from err
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    if overrides:
        extra = overrides if isinstance(overrides, dict) else parse_overrides(list(overrides))
        raw = merge(raw, extra)
    cfg = build(RunConfig, expand_env(fix_yaml_floats(raw), ""), "")
    _validate(cfg)
    return cfg


def check_paths(cfg: RunConfig) -> None:
    """The inputs a run reads and nothing creates exist; raises ConfigError naming key and path.

    The model folder (unless "tiny"), the DeepSpeed JSON (engine deepspeed), and data.root and
    eval.root unless the synthetic set will be generated into them."""
    model = cfg.model.name_or_path
    if model != "tiny" and not Path(model).is_dir():
        raise ConfigError(f"model.name_or_path: no model at {model!r}")
    if cfg.train.engine == "deepspeed" and not Path(cfg.train.deepspeed_config).is_file():
        raise ConfigError(f"train.deepspeed_config: no file at {cfg.train.deepspeed_config!r}")
    if cfg.data.synthetic.generate_if_missing:
        return
    if not Path(cfg.data.root).exists():
        raise ConfigError(f"data.root: no data at {cfg.data.root!r}")
    if cfg.eval.root and not Path(cfg.eval.root).is_dir():
        raise ConfigError(f"eval.root: no data at {cfg.eval.root!r} (empty skips the evaluation)")


def to_dict(cfg) -> dict:
    """The config as nested plain dicts (what save_config writes)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    """Write the resolved config (environment variables expanded, overrides applied) as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "LossConfig",
    "ModelConfig",
    "RunConfig",
    "TrainConfig",
    "check_paths",
    "load_config",
    "parse_overrides",
    "save_config",
    "to_dict",
]
