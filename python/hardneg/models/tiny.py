"""A random tiny LLaVA-OneVision built offline in seconds: for tests and the CPU demo.

Same architecture and code path as llava-hf/llava-onevision-qwen2-*-ov-hf (SigLIP vision tower,
2-layer MLP projector, Qwen2 language model, anyres image tiling, chat template), shrunk:
hidden 64, 2 layers everywhere, 32 px tiles of 8 px patches. A 32 x 32 image becomes a base tile
plus one anyres tile: 16 + 16 patch tokens + 4 newline tokens = 36 image tokens, so a whole
image+text sequence stays under ~80 tokens and the model trains on a CPU in minutes.

The tokenizer is a byte-level BPE trained here with `tokenizers` on a small built-in corpus (the
MMEB instructions and the synthetic data set's vocabulary), so nothing is downloaded. Byte-level
BPE covers any input string; words outside the corpus just cost more tokens.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
)

from hardneg.models.processor import LlavaOnevisionImageTextProcessor

TINY_HIDDEN = 64
TINY_LAYERS = 2
TINY_IMAGE_SIZE = 32
TINY_PATCH_SIZE = 8
# anyres tiling picks the pinpoint closest to the image's size: 32 px images get one extra tile,
# larger ones at most 2 x 2 tiles (88 image tokens), which bounds real-photo sequences too.
TINY_GRID_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]
TINY_VOCAB_SIZE = 1024

PAD_TOKEN = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
IMAGE_TOKEN, VIDEO_TOKEN = "<image>", "<video>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END, IMAGE_TOKEN, VIDEO_TOKEN]

# Qwen2-style chat template. Content may be a string or a list of {"type": "text" | "image"}
# parts rendered in order (the llava-hf templates render the same part types).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Training corpus of the tiny BPE: MMEB-style instructions plus the synthetic vocabulary
# (hardneg.data.synthetic), so the common words become single tokens.
_CORPUS = [
    "Represent the given image.",
    "Represent the given image for classification",
    "Represent the given image with the following question:",
    "Find me an everyday image that matches the given caption:",
    "Find an image caption describing the given everyday image.",
    "Find me an image that matches the given caption:",
    "Find a caption describing the given image.",
    "Select the portion of the image that follows the language expressions.",
    "Represent the following answer to an image classification task:",
    "What colour is the shape? What shape is it? How many shapes are there? Where are they?",
    "Which side of the image are the shapes on?",
    "one two three four five six seven eight nine ten zero yes no",
    "red green blue yellow magenta cyan orange purple white black grey brown pink",
    "circle circles square squares triangle triangles diamond diamonds cross crosses star stars",
    "left right top bottom middle centre center on the in of a an and with is are",
    "a photo of a cat dog car person bird tree house street food table chair",
    "user assistant system You are a helpful assistant.",
    "0 1 2 3 4 5 6 7 8 9 . , : ; ? ! ' \" ( ) - _ / \\ < > = + * # % & @",
]


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (vocab TINY_VOCAB_SIZE) trained on the built-in corpus, with the Qwen2
    special tokens, left padding and the chat template. Deterministic."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Repeats give the corpus words enough frequency to be merged into whole-word tokens.
    # Both the line-initial and the space-prefixed ("Ġword") forms of each word are seen.
    corpus = _CORPUS + [" " + line for line in _CORPUS]
    tok.train_from_iterator(corpus * 8, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        eos_token=IM_END,
        additional_special_tokens=[IM_START, IM_END, IMAGE_TOKEN, VIDEO_TOKEN],
        padding_side="left",
        model_max_length=2048,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_processor() -> LlavaOnevisionImageTextProcessor:
    """Processor over the tiny tokenizer and the PIL image processor (32 px tiles)."""
    tokenizer = build_tiny_tokenizer()
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
        image_grid_pinpoints=TINY_GRID_PINPOINTS,
    )
    return LlavaOnevisionImageTextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_image_tokens=(TINY_IMAGE_SIZE // TINY_PATCH_SIZE) ** 2,
        vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        video_token=VIDEO_TOKEN,
    )


def build_tiny_config(processor: LlavaOnevisionImageTextProcessor) -> LlavaOnevisionConfig:
    """SigLIP + Qwen2 config, hidden 64, 2 layers each, token ids taken from the processor."""
    tokenizer = processor.tokenizer
    vision_config = SiglipVisionConfig(
        hidden_size=TINY_HIDDEN,
        intermediate_size=2 * TINY_HIDDEN,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=4,
        image_size=TINY_IMAGE_SIZE,
        patch_size=TINY_PATCH_SIZE,
        vision_use_head=False,
    )
    text_config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=TINY_HIDDEN,
        intermediate_size=2 * TINY_HIDDEN,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    return LlavaOnevisionConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=processor.image_token_id,
        video_token_index=processor.video_token_id,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=TINY_GRID_PINPOINTS,
        tie_word_embeddings=True,
    )


def build_tiny_model(
    seed: int = 0,
) -> tuple[LlavaOnevisionForConditionalGeneration, LlavaOnevisionImageTextProcessor]:
    """Random tiny LlavaOnevisionForConditionalGeneration and its processor; same seed, same
    weights (the global RNG state is left untouched)."""
    processor = build_tiny_processor()
    config = build_tiny_config(processor)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaOnevisionForConditionalGeneration(config)
    model.eval()
    return model, processor
