"""Prompt formats: LLaVE's exact token sequence and pooled token, the format saved with the
checkpoint, and image placeholders on items without an image."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from fixtures.llava_hf_layout import write_processor_files
from hardneg.models import Embedder, EmbedderConfig
from hardneg.models.inputs import InputBuilder
from hardneg.models.processor import LlavaOnevisionImageTextProcessor
from PIL import Image

IMAGE_TOKEN = 151646

# LLaVE's llava/train/train.py preprocess_qwen (lines 567-642): the tokenizer's template is reset
# to this, each message is rendered and tokenized on its own, and the ids are concatenated.
LLAVE_MESSAGE_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
)


@pytest.fixture(scope="module")
def qwen_processor(tmp_path_factory):
    """The llava-hf 0.5b processor files (Qwen2 special tokens at Qwen2's ids)."""
    folder = tmp_path_factory.mktemp("processor")
    write_processor_files(folder)
    return LlavaOnevisionImageTextProcessor.from_pretrained(folder)


def llave_input_ids(tokenizer, text: str, has_image: bool) -> list[int]:
    """LLaVE's token ids for one MMEB text (model_embed.py lines 94-100, train.py 1074-1084 and
    preprocess_qwen): "<|image_1|>" -> "<image>", an image token that does not open the text moved
    to the front, then [system, human text, gpt "\\n"] tokenized message by message. Their
    <image> id is later swapped for the image's features; here it stays one <image> id."""
    if has_image:
        text = text.replace("<|image_1|>", "<image>")
        if text.count("<image>") == 1 and not text.startswith("<image>"):
            text = "<image>\n" + text.replace("<image>", "").strip()
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = LLAVE_MESSAGE_TEMPLATE
    ids = []
    for role, content in (
        ("system", "You are a helpful assistant."),
        ("user", text),
        ("assistant", "\n"),
    ):
        ids += tok.apply_chat_template([{"role": role, "content": content}])["input_ids"]
    return ids


def _attended_ids(inputs, row: int) -> list[int]:
    """Row's ids without padding, each run of image tokens collapsed to one."""
    ids = inputs["input_ids"][row][inputs["attention_mask"][row].bool()].tolist()
    return [t for k, t in enumerate(ids) if t != IMAGE_TOKEN or ids[k - 1] != IMAGE_TOKEN]


CASES = [
    ("Find me an everyday image that matches the given caption: a cat and a dog\n", False),
    ("<|image_1|>\nRepresent the given image with the following question: What is in it?\n", True),
    ("Compare <|image_1|> with the caption", True),  # the image is moved first, as LLaVE does
    ("", True),  # image only
]


def test_llave_format_is_llaves_token_sequence(qwen_processor):
    builder = InputBuilder(qwen_processor, EmbedderConfig(prompt_format="llave"))
    image = Image.new("RGB", (40, 30), (10, 200, 30))
    items = [{"text": t, "image": image if has_image else None} for t, has_image in CASES]
    inputs = builder(items[:3], role="query")
    for row, (text, has_image) in enumerate(CASES[:3]):
        assert _attended_ids(inputs, row) == llave_input_ids(
            qwen_processor.tokenizer, text, has_image
        ), text
    decode = qwen_processor.tokenizer.decode
    assert decode(_attended_ids(inputs, 1)) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nRepresent the given image with the following question: "
        "What is in it?\n<|im_end|>\n"
        "<|im_start|>assistant\n\n<|im_end|>\n"
    )
    assert decode(_attended_ids(inputs, 2)).count("<image>\nCompare  with the caption<|im_end|>")
    # Image-only items get "<image>" as their whole message (LLaVE never sees such rows).
    only = builder(items[3:], role="target")
    assert decode(_attended_ids(only, 0)).endswith(
        "user\n<image><|im_end|>\n<|im_start|>assistant\n\n<|im_end|>\n"
    )
    # The pooled token (the last attended one) is the newline after the assistant's <|im_end|>.
    newline = qwen_processor.tokenizer("\n", add_special_tokens=False)["input_ids"]
    for row in range(3):
        ids = _attended_ids(inputs, row)
        assert [ids[-2]] + [ids[-1]] == [151645] + newline


def test_hardneg_format_differs_from_llave(qwen_processor):
    """The checkpoint's own template (llava-hf: no system turn) ending in the assistant header:
    a different sequence and a different pooled position, which the comparison above detects."""
    builder = InputBuilder(qwen_processor, EmbedderConfig())
    text = CASES[0][0]
    ids = _attended_ids(builder([{"text": text, "image": None}]), 0)
    decoded = qwen_processor.tokenizer.decode(ids)
    assert decoded == f"<|im_start|>user\n{text.strip()}<|im_end|>\n<|im_start|>assistant\n"
    assert ids != llave_input_ids(qwen_processor.tokenizer, text, False)


def test_prompt_format_saved_with_the_checkpoint(tmp_path):
    items = [
        {"text": "a red circle", "image": None},
        {"text": "<|image_1|>\nRepresent the given image.", "image": Image.new("RGB", (32, 32))},
    ]
    llave = Embedder.tiny(seed=0, prompt_format="llave")
    hardneg = Embedder.tiny(seed=0)
    assert (llave.encode(items) - hardneg.encode(items)).abs().max() > 1e-3
    llave.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "hardneg_embedder.json").read_text())
    assert saved["prompt_format"] == "llave" and saved["placeholder_without_image"] == "strip"
    loaded = Embedder.from_pretrained(tmp_path)
    assert loaded.config.prompt_format == "llave"
    torch.testing.assert_close(loaded.encode(items), llave.encode(items), atol=0, rtol=0)
    as_hardneg = Embedder.from_pretrained(tmp_path, config={"prompt_format": "hardneg"})
    torch.testing.assert_close(as_hardneg.encode(items), hardneg.encode(items), atol=0, rtol=0)
    with pytest.raises(ValueError, match="prompt_format must be one of"):
        EmbedderConfig(prompt_format="llava")


@pytest.mark.parametrize("prompt_format", ["hardneg", "llave"])
def test_placeholder_without_image_is_stripped_and_counted(prompt_format, caplog):
    embedder = Embedder.tiny(seed=0, prompt_format=prompt_format)
    webqa = "<|image_1|>\nFind a Wikipedia image that answers this question: Where is it?"
    plain = "Find a Wikipedia image that answers this question: Where is it?"
    with caplog.at_level(logging.WARNING, logger="hardneg.models"):
        got = embedder.prepare([{"text": webqa, "image": None}, {"text": "x", "image": None}])
    want = embedder.prepare([{"text": plain, "image": None}, {"text": "x", "image": None}])
    assert torch.equal(got["input_ids"], want["input_ids"])
    assert embedder.input_builder.placeholders_stripped == 1
    assert "item 0 has an image placeholder but no image: placeholder removed" in caplog.text
    strict = Embedder.tiny(seed=0, prompt_format=prompt_format, placeholder_without_image="error")
    with pytest.raises(ValueError, match="item 0 has an image placeholder in its text but no"):
        strict.prepare([{"text": webqa, "image": None}])
