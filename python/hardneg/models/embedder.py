"""Embedder: a LLaVA-OneVision model used as a universal multimodal embedder.

The embedding of an input (text, image, or image + text) is the last-layer hidden state of its last
non-pad token, L2-normalised, computed inside the model's chat template (LLaVE, arXiv 2503.04812;
VLM2Vec). Role-specific instructions (query / target) are put into the user message; MMEB's
"<|image_1|>" placeholder is replaced by the model's image token, which the processor then expands
to the image's feature count.

Legend: B inputs in a batch, L padded sequence length, H hidden size (= D, the embedding dim).

Checkpoint layout (save_pretrained / from_pretrained): transformers' model files (config.json,
model.safetensors), the processor files (tokenizer, image processor, chat template) and
hardneg_embedder.json with the pooling, padding side and prompts. A plain llava-hf checkpoint
(e.g. llava-hf/llava-onevision-qwen2-0.5b-ov-hf downloaded to a local folder) loads too, with the
default EmbedderConfig.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import LlavaOnevisionForConditionalGeneration

from hardneg.data.images import MMEB_IMAGE_PLACEHOLDER, load_image
from hardneg.models.processor import LlavaOnevisionImageTextProcessor

CONFIG_NAME = "hardneg_embedder.json"
ROLES = ("query", "target")
POOLINGS = ("last_token",)
PADDING_SIDES = ("left", "right")
# What Embedder.forward takes; other processor outputs (e.g. token_type_ids) are dropped.
MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_sizes", "batch_num_images")

# LoRA targets: the attention and MLP projections of the language model only (LLaVE fine-tunes
# the LLM and keeps the vision tower frozen; the projector is trained in full by the trainer).
LORA_TARGET_MODULES = (
    r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
)


@dataclasses.dataclass
class EmbedderConfig:
    """What turns items into token sequences and hidden states into embeddings; saved with the
    weights as hardneg_embedder.json.

    The user message of an item is `{role}_template` formatted with `instruction` and `text`, then
    stripped of surrounding whitespace (so an empty instruction leaves no blank line). The
    instruction is the one passed to prepare(), else `{role}_instruction`."""

    pooling: str = "last_token"
    padding_side: str = "left"
    query_template: str = "{instruction}\n{text}"
    target_template: str = "{instruction}\n{text}"
    query_instruction: str = ""
    target_instruction: str = ""
    # LLaVE embeds the prompt followed by the assistant header: the last token then summarises
    # the whole user turn.
    add_generation_prompt: bool = True

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.padding_side not in PADDING_SIDES:
            raise ValueError(
                f"padding_side must be one of {PADDING_SIDES}, got {self.padding_side!r}"
            )
        for role in ROLES:
            template = getattr(self, f"{role}_template")
            if "{text}" not in template:
                raise ValueError(f"{role}_template must contain '{{text}}', got {template!r}")

    @classmethod
    def from_dict(cls, values: dict) -> EmbedderConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown {CONFIG_NAME} field(s) {unknown}; known: {sorted(names)}")
        return cls(**values)


class InputBuilder:
    """Items -> model inputs (chat template, instructions, image loading, padding). Holds only the
    processor and the config, so a DataLoader worker can build batches without the model."""

    def __init__(self, processor: LlavaOnevisionImageTextProcessor, config: EmbedderConfig):
        self.processor = processor
        self.config = config

    @property
    def image_token(self) -> str:
        return self.processor.image_token

    def user_text(self, item: dict, role: str, instruction: str | None, index: int) -> str:
        """The user message of one item, with the image token where the image goes."""
        text = item.get("text") or ""
        has_image = item.get("image") is not None
        n_placeholders = text.count(MMEB_IMAGE_PLACEHOLDER) + text.count(self.image_token)
        if n_placeholders > 1:
            raise ValueError(
                f"item {index} has {n_placeholders} image placeholders in its text; one image per "
                f"item is supported: {text!r}"
            )
        if n_placeholders and not has_image:
            raise ValueError(f"item {index} has an image placeholder in its text but no image")
        text = text.replace(MMEB_IMAGE_PLACEHOLDER, self.image_token)
        if instruction is None:
            instruction = getattr(self.config, f"{role}_instruction")
        template = getattr(self.config, f"{role}_template")
        message = template.format(instruction=instruction, text=text).strip()
        if has_image and not n_placeholders:
            # MMEB puts the image first ("<|image_1|>\nRepresent ..."): do the same.
            message = f"{self.image_token}\n{message}" if message else self.image_token
        return message

    def __call__(
        self,
        items: Sequence[dict],
        role: str = "query",
        instructions: Sequence[str] | str | None = None,
    ) -> dict[str, Tensor]:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        if len(items) == 0:
            raise ValueError("items is empty")
        if isinstance(instructions, str):
            instructions = [instructions] * len(items)
        if instructions is not None and len(instructions) != len(items):
            raise ValueError(
                f"instructions has {len(instructions)} entries but items has {len(items)}"
            )
        texts, images = [], []
        for i, item in enumerate(items):
            if not isinstance(item, dict) or not ({"text", "image"} & set(item)):
                raise ValueError(
                    f"item {i} must be a dict with 'text' and/or 'image', got {item!r}"
                )
            if item.get("text") is None and item.get("image") is None:
                raise ValueError(f"item {i} has neither text nor image")
            instruction = instructions[i] if instructions is not None else None
            message = self.user_text(item, role, instruction, i)
            texts.append(self._apply_chat_template(message))
            image = item.get("image")
            if image is not None:
                images.append(_as_rgb(image, where=f"item {i}"))
        tokenizer = self.processor.tokenizer
        tokenizer.padding_side = self.config.padding_side
        batch = self.processor(text=texts, images=images or None, padding=True, return_tensors="pt")
        return {k: v for k, v in batch.items() if k in MODEL_INPUTS}

    def _apply_chat_template(self, message: str) -> str:
        conversation = [{"role": "user", "content": [{"type": "text", "text": message}]}]
        owner = self.processor if self.processor.chat_template else self.processor.tokenizer
        if not getattr(owner, "chat_template", None):
            raise ValueError("neither the processor nor its tokenizer has a chat template")
        return owner.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=self.config.add_generation_prompt
        )


def _as_rgb(image, where: str) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    if isinstance(image, (str, os.PathLike)):
        return load_image(image, where=where)
    raise TypeError(f"{where}: image must be a PIL.Image or a path, got {type(image).__name__}")


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
        attn_implementation, ...) except `config`, a dict overriding hardneg_embedder.json."""
        path = Path(path)
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
