"""Items -> token sequences: the Embedder's prompt formats, instructions and image placeholders.

An item is {"text": str | None, "image": PIL.Image | path | None}. Two prompt formats, chosen by
EmbedderConfig.prompt_format and saved with the checkpoint:

"hardneg": the checkpoint's own chat template around one user message, then (by default) the
    assistant header; the last token is the newline after "<|im_start|>assistant". For llava-hf
    checkpoints (no system turn in their template):
        <|im_start|>user\\n{message}<|im_end|>\\n<|im_start|>assistant\\n

"llave": LLaVE's embedding prompt, exactly as its training and evaluation code build it
    (DeepLearnXMU/LLaVE: llava/train/train.py preprocess_qwen, lines 567-642, called on
    [{"from": "human", "value": text}, {"from": "gpt", "value": "\\n"}] at lines 1074-1084 and in
    llava/eval/model_embed.py lines 94-100; conv template "qwen_1_5", llava/conversation.py 443):
        <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
        <|im_start|>user\\n{message}<|im_end|>\\n
        <|im_start|>assistant\\n\\n<|im_end|>\\n
    pooled at the last token, the final newline (llava_qwen.py _pooling, lines 67-77: hidden state
    of the last attended position, L2-normalised). The message is the MMEB text with
    "<|image_1|>" -> "<image>"; a single image token that does not open the text is moved to the
    front as "<image>\\n" + the rest stripped (preprocess_multimodal). Known differences, both on
    rows MMEB does not have or that the readers already change: an image with no placeholder in its
    text is put first here (LLaVE drops the image), and a placeholder with no image is removed here
    (LLaVE inserts the features of an all-zero pixel tile).

A placeholder on an item without an image (MMEB's WebQA queries) is removed and counted
(`InputBuilder.placeholders_stripped`), or raises under placeholder_without_image="error".
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence

from PIL import Image
from torch import Tensor

from hardneg.data.images import MMEB_IMAGE_PLACEHOLDER, load_image, strip_image_placeholder

log = logging.getLogger(__name__)

CONFIG_NAME = "hardneg_embedder.json"
ROLES = ("query", "target")
POOLINGS = ("last_token",)
PADDING_SIDES = ("left", "right")
PROMPT_FORMATS = ("hardneg", "llave")
PLACEHOLDER_POLICIES = ("strip", "error")
# What Embedder.forward takes; other processor outputs (e.g. token_type_ids) are dropped.
MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_sizes", "batch_num_images")

# LLaVE's prompt pieces (preprocess_qwen's per-message template and its default system message).
LLAVE_SYSTEM = "You are a helpful assistant."
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


@dataclasses.dataclass
class EmbedderConfig:
    """What turns items into token sequences and hidden states into embeddings; saved with the
    weights as hardneg_embedder.json.

    prompt_format: "hardneg" or "llave" (module docstring). The user message of an item is
    `{role}_template` formatted with `instruction` and `text`; under "hardneg" it is then stripped
    of surrounding whitespace (so an empty instruction leaves no blank line), under "llave" an
    empty instruction leaves the text untouched. The instruction is the one passed to prepare(),
    else `{role}_instruction`. placeholder_without_image: "strip" or "error"."""

    pooling: str = "last_token"
    padding_side: str = "left"
    query_template: str = "{instruction}\n{text}"
    target_template: str = "{instruction}\n{text}"
    query_instruction: str = ""
    target_instruction: str = ""
    # "hardneg" format only: embed the prompt followed by the assistant header, so the last token
    # summarises the whole user turn.
    add_generation_prompt: bool = True
    prompt_format: str = "hardneg"
    placeholder_without_image: str = "strip"

    def __post_init__(self):
        for name, allowed in (
            ("pooling", POOLINGS),
            ("padding_side", PADDING_SIDES),
            ("prompt_format", PROMPT_FORMATS),
            ("placeholder_without_image", PLACEHOLDER_POLICIES),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
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


def llave_prompt(message: str) -> str:
    """LLaVE's full embedding prompt around one user message (module docstring)."""
    return (
        f"{IM_START}system\n{LLAVE_SYSTEM}{IM_END}\n"
        f"{IM_START}user\n{message}{IM_END}\n"
        f"{IM_START}assistant\n\n{IM_END}\n"
    )


class InputBuilder:
    """Items -> model inputs (prompt, instructions, image loading, padding). Holds only the
    processor and the config, so a DataLoader worker can build batches without the model."""

    def __init__(self, processor, config: EmbedderConfig):
        self.processor = processor
        self.config = config
        self.placeholders_stripped = 0
        if config.prompt_format == "llave":
            vocab = processor.tokenizer.get_vocab()
            missing = [t for t in (IM_START, IM_END) if t not in vocab]
            if missing:
                raise ValueError(
                    f"prompt_format 'llave' needs a Qwen2 chat tokenizer; this one lacks {missing}"
                )

    @property
    def image_token(self) -> str:
        return self.processor.image_token

    def _placeholders(self, text: str, has_image: bool, index: int) -> str:
        """`text` with one placeholder at most, none without an image (stripped or an error)."""
        n = text.count(MMEB_IMAGE_PLACEHOLDER) + text.count(self.image_token)
        if n > 1:
            raise ValueError(
                f"item {index} has {n} image placeholders in its text; one image per item is "
                f"supported: {text!r}"
            )
        if n and not has_image:
            if self.config.placeholder_without_image == "error":
                raise ValueError(f"item {index} has an image placeholder in its text but no image")
            text = strip_image_placeholder(text.replace(self.image_token, MMEB_IMAGE_PLACEHOLDER))
            self.placeholders_stripped += 1
            log.log(
                logging.WARNING if self.placeholders_stripped == 1 else logging.DEBUG,
                "item %d has an image placeholder but no image: placeholder removed (%d so far)",
                index,
                self.placeholders_stripped,
            )
        return text.replace(MMEB_IMAGE_PLACEHOLDER, self.image_token)

    def user_text(self, item: dict, role: str, instruction: str | None, index: int) -> str:
        """The user message of one item, with the image token where the image goes."""
        has_image = item.get("image") is not None
        text = self._placeholders(item.get("text") or "", has_image, index)
        if instruction is None:
            instruction = getattr(self.config, f"{role}_instruction")
        template = getattr(self.config, f"{role}_template")
        token = self.image_token
        if self.config.prompt_format == "llave":
            message = template.format(instruction=instruction, text=text) if instruction else text
            if has_image and not message.startswith(token):
                # LLaVE's preprocess_multimodal: the image goes first, the rest is stripped.
                rest = message.replace(token, "").strip()
                message = f"{token}\n{rest}" if rest else token
            return message
        message = template.format(instruction=instruction, text=text).strip()
        if has_image and token not in text:
            # MMEB puts the image first ("<|image_1|>\nRepresent ..."): do the same.
            message = f"{token}\n{message}" if message else token
        return message

    def prompt(self, message: str) -> str:
        """The full prompt string of one user message, in the configured format."""
        if self.config.prompt_format == "llave":
            return llave_prompt(message)
        conversation = [{"role": "user", "content": [{"type": "text", "text": message}]}]
        owner = self.processor if self.processor.chat_template else self.processor.tokenizer
        if not getattr(owner, "chat_template", None):
            raise ValueError("neither the processor nor its tokenizer has a chat template")
        return owner.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=self.config.add_generation_prompt
        )

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
            texts.append(self.prompt(self.user_text(item, role, instruction, i)))
            image = item.get("image")
            if image is not None:
                images.append(_as_rgb(image, where=f"item {i}"))
        tokenizer = self.processor.tokenizer
        tokenizer.padding_side = self.config.padding_side
        batch = self.processor(text=texts, images=images or None, padding=True, return_tensors="pt")
        return {k: v for k, v in batch.items() if k in MODEL_INPUTS}


def _as_rgb(image, where: str) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    if isinstance(image, (str, os.PathLike)):
        return load_image(image, where=where)
    raise TypeError(f"{where}: image must be a PIL.Image or a path, got {type(image).__name__}")
