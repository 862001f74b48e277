"""Embedder: a LLaVA-OneVision model used as a universal multimodal embedder.

The embedding of an input (text, image, or image + text) is the last-layer hidden state of its last
non-pad token, L2-normalised, computed inside a chat prompt (LLaVE, arXiv 2503.04812; VLM2Vec):
the checkpoint's own template ("hardneg" format) or LLaVE's exact embedding prompt ("llave"); see
inputs.py for both, the instructions and MMEB's "<|image_1|>" placeholder, which becomes the
model's image token, expanded by the processor to the image's feature count.

Legend: B inputs in a batch, L padded sequence length, H hidden size (= D, the embedding dim).

Checkpoint layout (save_pretrained / from_pretrained): transformers' model files (config.json,
model.safetensors), the processor files (tokenizer, image processor, chat template) and
hardneg_embedder.json with the pooling, padding side, prompt format and prompts. A plain llava-hf
checkpoint (e.g. llava-hf/llava-onevision-qwen2-0.5b-ov-hf downloaded to a local folder) loads too,
with the default EmbedderConfig, and without torchvision.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import LlavaOnevisionForConditionalGeneration

from hardneg.models.inputs import (
    CONFIG_NAME,
    MODEL_INPUTS,
    PROMPT_FORMATS,
    EmbedderConfig,
    InputBuilder,
)
from hardneg.models.processor import LlavaOnevisionImageTextProcessor

__all__ = [
    "CONFIG_NAME",
    "MODEL_INPUTS",
    "PROMPT_FORMATS",
    "Embedder",
    "EmbedderConfig",
    "InputBuilder",
    "last_token_pool",
    "load_embedder",
]

# LoRA targets: the attention and MLP projections of the language model only (LLaVE fine-tunes
# the LLM and keeps the vision tower frozen; the projector is trained in full by the trainer).
LORA_TARGET_MODULES = (
    r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
)


def last_token_pool(hidden_BLH: Tensor, attention_mask_BL: Tensor) -> Tensor:
    """hidden_BLH (B, L, H) at the last position whose attention_mask is 1 -> (B, H). Works for
    left and right padding (and any mix): the index is found from the mask, not assumed."""
    L = attention_mask_BL.shape[1]
    last_B = L - 1 - attention_mask_BL.flip(1).long().argmax(dim=1)
    return hidden_BLH[torch.arange(hidden_BLH.shape[0], device=hidden_BLH.device), last_B]


class Embedder(nn.Module):
    """LLaVA-OneVision (transformers' LlavaOnevisionForConditionalGeneration) as an embedder.

    embedder.prepare(items, role) -> inputs;  embedder(**inputs) -> (B, D) fp32 unit vectors,
    differentiable;  embedder.encode(items) -> (n, D) under no_grad (CPU tensor).
    Items are dicts {"text": str | None, "image": PIL.Image | path | None}.
    """

    def __init__(
        self,
        model: LlavaOnevisionForConditionalGeneration,
        processor: LlavaOnevisionImageTextProcessor,
        config: EmbedderConfig | None = None,
    ):
        super().__init__()
        self.model = model
        self.config = config or EmbedderConfig()
        self.input_builder = InputBuilder(processor, self.config)
        image_token_id = self._llava().config.image_token_id
        if processor.image_token_id != image_token_id:
            raise ValueError(
                f"processor image token id {processor.image_token_id} != model image_token_id "
                f"{image_token_id}: processor and model come from different checkpoints"
            )

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def tiny(cls, seed: int = 0, **config) -> Embedder:
        """Random tiny model (hidden 64, 2 layers, 32 px images) built offline in seconds."""
        from hardneg.models.tiny import build_tiny_model

        model, processor = build_tiny_model(seed)
        return cls(model, processor, EmbedderConfig(**config))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> Embedder:
        """Load from a local folder written by save_pretrained or holding a llava-hf
        LLaVA-OneVision checkpoint. kwargs go to transformers' from_pretrained (dtype,
        attn_implementation, ...) except `config`, a dict overriding hardneg_embedder.json (e.g.
        {"prompt_format": "llave"}). Raises FileNotFoundError "no model at PATH" when `path` is
        not a folder holding a config.json (nothing is downloaded)."""
        path = Path(path)
        if not (path / "config.json").is_file():
            reason = "no config.json in it" if path.is_dir() else "no such directory"
            raise FileNotFoundError(
                f"no model at {str(path)!r} ({reason}); pass a folder written by "
                "Embedder.save_pretrained or a downloaded llava-hf LLaVA-OneVision checkpoint"
            )
        overrides = kwargs.pop("config", None) or {}
        values = {}
        if (path / CONFIG_NAME).is_file():
            values = json.loads((path / CONFIG_NAME).read_text())
        config = EmbedderConfig.from_dict({**values, **overrides})
        model = LlavaOnevisionForConditionalGeneration.from_pretrained(path, **kwargs)
        # llava-hf checkpoints name LlavaOnevisionProcessor; the same files load into the
        # image-text subclass (no video processor, hence no torchvision).
        processor = LlavaOnevisionImageTextProcessor.from_pretrained(path)
        model.eval()
        return cls(model, processor, config)

    def save_pretrained(self, path: str | os.PathLike, **kwargs) -> None:
        """Write weights (safetensors), processor and hardneg_embedder.json to `path`. A model
        wrapped with LoRA is saved with its adapters merged (a plain checkpoint); the live model is
        left untouched."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        llava = self._llava()
        if llava is not self.model and "state_dict" not in kwargs:
            kwargs["state_dict"] = _merged_lora_state_dict(llava)
        llava.save_pretrained(path, **kwargs)
        self.processor.save_pretrained(path)
        (path / CONFIG_NAME).write_text(
            json.dumps(dataclasses.asdict(self.config), indent=2) + "\n"
        )

    # -- properties --------------------------------------------------------------------------

    @property
    def processor(self) -> LlavaOnevisionImageTextProcessor:
        return self.input_builder.processor

    @property
    def dim(self) -> int:
        """Embedding dim D (the language model's hidden size)."""
        return self._llava().config.text_config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _llava(self) -> LlavaOnevisionForConditionalGeneration:
        """The transformers model, through a peft wrapper if there is one."""
        model = self.model
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    # -- training helpers --------------------------------------------------------------------

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None):
        """transformers' gradient checkpointing of the vision tower and language model layers.
        Non-reentrant by default: it works with frozen inputs and LoRA without input grads."""
        kwargs = gradient_checkpointing_kwargs or {"use_reentrant": False}
        llava = self._llava()
        # transformers 5 renamed it activation checkpointing; older versions only have the old name.
        if hasattr(llava, "activation_checkpointing_enable"):
            llava.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            llava.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def gradient_checkpointing_disable(self):
        llava = self._llava()
        if hasattr(llava, "activation_checkpointing_disable"):
            llava.activation_checkpointing_disable()
        else:
            llava.gradient_checkpointing_disable()

    def add_lora(
        self,
        *,
        r: int = 16,
        alpha: int = 32,
        dropout: float = 0.05,
        target_modules: str | list[str] = LORA_TARGET_MODULES,
    ) -> None:
        """Wrap the model with peft LoRA adapters on the language model's projections; only the
        adapters are left trainable (unfreeze other parts, e.g. the projector, afterwards)."""
        from peft import LoraConfig, get_peft_model

        if self._llava() is not self.model:
            raise ValueError("the model is already wrapped by peft")
        lora_config = LoraConfig(
            r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules
        )
        self.model = get_peft_model(self.model, lora_config)

    # -- embedding ---------------------------------------------------------------------------

    def prepare(
        self,
        items: Sequence[dict],
        role: str = "query",
        instructions: Sequence[str] | str | None = None,
    ) -> dict[str, Tensor]:
        """Model inputs for a batch of items (CPU tensors): input_ids, attention_mask (B, L) and,
        when any item has an image, pixel_values, image_sizes, batch_num_images."""
        return self.input_builder(items, role=role, instructions=instructions)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        pixel_values: Tensor | None = None,
        image_sizes: Tensor | None = None,
        batch_num_images: Tensor | None = None,
    ) -> Tensor:
        """(B, D) fp32 L2-normalised embeddings: the last-layer hidden state at each row's last
        non-pad token.

        Position ids are computed from the attention mask, so a sequence gets the same positions
        (and embedding) under left and right padding."""
        position_ids_BL = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        if pixel_values is not None:
            pixel_values = pixel_values.to(self.dtype)
        # The backbone (LlavaOnevisionModel) skips the LM head: B x L x vocab logits never exist.
        out = self._llava().model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_BL,
            pixel_values=pixel_values,
            image_sizes=image_sizes,
            batch_num_images=batch_num_images,
            use_cache=False,
        )
        emb_BH = last_token_pool(out.last_hidden_state, attention_mask)
        return F.normalize(emb_BH.float(), dim=-1)

    @torch.no_grad()
    def encode(
        self,
        items: Sequence[dict],
        role: str = "query",
        batch_size: int = 32,
        show_progress_bar: bool = False,
        instructions: Sequence[str] | str | None = None,
    ) -> Tensor:
        """(n, D) fp32 unit embeddings of `items` on the CPU, in order, batch_size at a time, in
        eval mode (the module's training flag is restored afterwards)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if isinstance(instructions, str):
            instructions = [instructions] * len(items)
        if instructions is not None and len(instructions) != len(items):
            raise ValueError(
                f"instructions has {len(instructions)} entries but items has {len(items)}"
            )
        was_training = self.training
        self.eval()
        device = self.device
        chunks = []
        try:
            for start in tqdm(
                range(0, len(items), batch_size),
                desc=f"encode {role}",
                disable=not show_progress_bar,
            ):
                end = start + batch_size
                inputs = self.prepare(
                    items[start:end],
                    role=role,
                    instructions=instructions[start:end] if instructions is not None else None,
                )
                inputs = {k: v.to(device) for k, v in inputs.items()}
                chunks.append(self(**inputs).cpu())
        finally:
            self.train(was_training)
        if not chunks:
            return torch.empty(0, self.dim)
        return torch.cat(chunks)


def _merged_lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """State dict of a peft-injected model with every LoRA delta added to its base weight and the
    adapter entries dropped: the keys and shapes of the plain model."""
    from peft.tuners.lora import LoraLayer

    deltas = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and not module.merged:
            delta = None
            for adapter in module.active_adapters:
                if adapter in module.lora_A or adapter in module.lora_embedding_A:
                    d = module.get_delta_weight(adapter)
                    delta = d if delta is None else delta + d
            if delta is not None:
                deltas[f"{name}.base_layer.weight"] = delta
    state = {}
    for key, value in model.state_dict().items():
        if ".lora_" in key:
            continue
        if key in deltas:
            value = value + deltas[key].to(value.dtype)
        state[key.replace(".base_layer.", ".")] = value
    return state


def load_embedder(
    spec: str, device: torch.device, dtype: str = "auto", prompt_format: str | None = None
) -> Embedder:
    """The embedder a command line names, on `device`, in eval mode.

    spec: a checkpoint folder (Embedder.save_pretrained, or a downloaded llava-hf
    LLaVA-OneVision checkpoint), or "tiny[:SEED]" for the random tiny model. dtype: "auto"
    (bfloat16 on CUDA, float32 elsewhere), "float32" or "bfloat16". prompt_format overrides the
    checkpoint's (inputs.PROMPT_FORMATS)."""
    override = {"prompt_format": prompt_format} if prompt_format else {}
    if spec == "tiny" or spec.startswith("tiny:"):
        embedder = Embedder.tiny(seed=int(spec.partition(":")[2] or 0), **override)
    else:
        embedder = Embedder.from_pretrained(spec, config=override)
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'auto', 'float32' or 'bfloat16', got {dtype!r}")
    return embedder.to(device=device, dtype=getattr(torch, dtype)).eval()
