"""Embedder.from_pretrained on a folder shaped like llava-hf/llava-onevision-qwen2-0.5b-ov-hf
(tests/fixtures/llava_hf_layout.py: the real files and dimensions, layer counts cut), without
torchvision; and the "no model at PATH" error."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from fixtures.llava_hf_layout import SPECIAL_TOKENS, write_checkpoint
from fixtures.mmeb_layout import save_jpeg
from hardneg.models import Embedder
from PIL import Image

IMAGE_TOKEN, IM_START, IM_END = 151646, 151644, 151645


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llava-onevision-qwen2-0.5b-ov-hf")
    weights = write_checkpoint(folder)
    return folder, weights


@pytest.fixture(scope="module")
def embedder(checkpoint):
    return Embedder.from_pretrained(checkpoint[0], dtype=torch.bfloat16)


def test_loads_without_torchvision(checkpoint, embedder):
    assert importlib.util.find_spec("torchvision") is None, "the test environment must lack it"
    assert "torchvision" not in sys.modules
    proc = embedder.processor
    assert type(proc.image_processor).__name__ == "LlavaOnevisionImageProcessorPil"
    assert list(proc.image_processor.image_mean) == [0.5, 0.5, 0.5]
    assert proc.image_token_id == IMAGE_TOKEN == embedder.model.config.image_token_id
    assert proc.tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS.values())) == list(
        SPECIAL_TOKENS
    )
    text = embedder.model.config.text_config
    assert (text.hidden_size, text.num_attention_heads, text.num_key_value_heads) == (896, 14, 2)
    assert embedder.dim == 896 and embedder.model.config.vision_config.hidden_size == 1152
    # The hub's key names were mapped onto the model: the weights are the file's, not a fresh init.
    _, weights = checkpoint
    model = embedder.model.model
    for name, param in [
        ("multi_modal_projector.linear_1.weight", model.multi_modal_projector.linear_1.weight),
        ("image_newline", model.image_newline),
        ("language_model.model.embed_tokens.weight", model.language_model.embed_tokens.weight),
        (
            "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
            model.vision_tower.encoder.layers[0].mlp.fc1.weight,
        ),
    ]:
        torch.testing.assert_close(param, weights[name].to(param.dtype), atol=0, rtol=0, msg=name)


def test_encodes_images_and_text(checkpoint, embedder, tmp_path):
    for k, mode in enumerate(["RGB", "L", "CMYK"]):
        save_jpeg(tmp_path / f"{mode}.jpg", k, mode, size=(300, 200))
    items = [
        {"text": "<|image_1|>\nRepresent the given image.", "image": str(tmp_path / "RGB.jpg")},
        {"text": "<|image_1|>\nRepresent the given image.", "image": str(tmp_path / "L.jpg")},
        {"text": "<|image_1|>\nRepresent the given image.", "image": str(tmp_path / "CMYK.jpg")},
        {"text": "Find me an everyday image that matches the given caption: a cat", "image": None},
    ]
    inputs = embedder.prepare(items)
    ids = inputs["input_ids"][0][inputs["attention_mask"][0].bool()].tolist()
    # anyres: a 300 x 200 image is one 384 px base tile and one tile of the 384 x 384 grid.
    assert inputs["pixel_values"].shape == (3, 2, 3, 384, 384)
    assert ids.count(IMAGE_TOKEN) > 729 and ids[0] == IM_START and IM_END in ids
    out = embedder.encode(items, batch_size=4)
    assert out.shape == (4, 896) and out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(4), atol=1e-5, rtol=0)
    # Different pixels, different embeddings; the same image alone embeds the same (bf16 model:
    # padding changes the rounding of a few sums, hence the cosine bound).
    assert (out[0] @ out[2]) < 0.9999
    alone = embedder.encode(items[:1])
    assert float(alone[0] @ out[0]) > 0.99
    assert Image.open(tmp_path / "CMYK.jpg").mode == "CMYK"


def test_missing_model_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no model at '.*nope' \(no such directory\)"):
        Embedder.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no model at '.*empty' \(no config.json in it\)"):
        Embedder.from_pretrained(tmp_path / "empty")
