"""Embedder: pooling, normalisation, padding sides, modalities, encode, save/load, LoRA, grads."""

import copy
import json
import shutil

import hardneg
import pytest
import torch
import torch.nn.functional as F
from hardneg.models import Embedder, last_token_pool

# fp32 forward of the same sequence through different paddings / batch compositions: attention
# over a few dozen tokens of a 64-wide model rounds at ~1e-7 per op, so 1e-5 is a wide margin,
# and far below the ~1e-1 distance between embeddings of different inputs.
ATOL = 1e-5


def _manual_last_token(embedder, inputs):
    """Hidden state of the last non-pad token via output_hidden_states and a Python loop."""
    mask = inputs["attention_mask"]
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    out = embedder.model(**inputs, position_ids=position_ids, output_hidden_states=True)
    last_layer = out.hidden_states[-1]
    rows = []
    for b in range(mask.shape[0]):
        idx = [t for t in range(mask.shape[1]) if mask[b, t] == 1][-1]
        rows.append(last_layer[b, idx])
    return F.normalize(torch.stack(rows).float(), dim=-1)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_pooling_picks_last_non_pad_token(tiny_embedder, items, padding_side):
    emb = copy.deepcopy(tiny_embedder)
    emb.config.padding_side = padding_side
    inputs = emb.prepare(items)
    pad_col = 0 if padding_side == "left" else -1
    assert (inputs["attention_mask"][:, pad_col] == 0).any(), "batch must contain padding"
    with torch.no_grad():
        got = emb(**inputs)
        want = _manual_last_token(emb, inputs)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_pooling_comparison_can_fail(tiny_embedder, items):
    """Pooling the first real token instead of the last is caught by the same comparison."""
    inputs = tiny_embedder.prepare(items)
    with torch.no_grad():
        want = _manual_last_token(tiny_embedder, inputs)
        mask = inputs["attention_mask"]
        wrong_mask = torch.zeros_like(mask)
        first = mask.argmax(dim=1)
        wrong_mask[torch.arange(len(first)), first] = 1
        hidden = tiny_embedder.model.model(
            **inputs, position_ids=(mask.cumsum(-1) - 1).clamp_min(0)
        ).last_hidden_state
        wrong = F.normalize(last_token_pool(hidden, wrong_mask).float(), dim=-1)
    assert (wrong - want).abs().max() > 100 * ATOL


def test_last_token_pool_mixed_padding():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).view(2, 4, 1)
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]])
    assert last_token_pool(hidden, mask).flatten().tolist() == [2.0, 7.0]


def test_unit_norm_fp32_and_shape(tiny_embedder, items):
    with torch.no_grad():
        out = tiny_embedder(**tiny_embedder.prepare(items))
    assert out.dtype == torch.float32
    assert out.shape == (len(items), tiny_embedder.dim) == (len(items), 64)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(len(items)), atol=1e-6, rtol=0)


def test_left_and_right_padding_agree(tiny_embedder, items):
    emb = copy.deepcopy(tiny_embedder)
    with torch.no_grad():
        emb.config.padding_side = "left"
        left_inputs = emb.prepare(items)
        left = emb(**left_inputs)
        emb.config.padding_side = "right"
        right_inputs = emb.prepare(items)
        right = emb(**right_inputs)
    assert not torch.equal(left_inputs["input_ids"], right_inputs["input_ids"])
    torch.testing.assert_close(left, right, atol=ATOL, rtol=0)


def test_modalities_differ_and_image_matters(tiny_embedder, items):
    """Text, image and image+text inputs all embed, and the pixels reach the embedding."""
    red = items[1]["image"]
    blue = items[2]["image"]
    batch = [
        {"text": "a shape", "image": None},
        {"text": "a shape", "image": red},
        {"text": "a shape", "image": blue},
        {"text": None, "image": red},
    ]
    with torch.no_grad():
        out = tiny_embedder(**tiny_embedder.prepare(batch))
    dist = torch.cdist(out, out)
    off_diag = dist[~torch.eye(len(batch), dtype=torch.bool)]
    assert off_diag.min() > 1e-3


def test_placeholder_maps_to_expanded_image_token(tiny_embedder, items):
    builder = tiny_embedder.input_builder
    proc = tiny_embedder.processor
    with_placeholder = {"text": "<|image_1|>\nwhat colour?", "image": items[1]["image"]}
    without = {"text": "what colour?", "image": items[1]["image"]}
    assert builder.user_text(with_placeholder, "query", None, 0) == "<image>\nwhat colour?"
    assert builder.user_text(without, "query", None, 0) == "<image>\nwhat colour?"
    ids = tiny_embedder.prepare([with_placeholder])["input_ids"][0]
    # 32 px image: base tile (4 x 4 patches) + one anyres tile (4 x 4) + 4 newline tokens.
    assert int((ids == proc.image_token_id).sum()) == 36
    assert proc.image_token_id == tiny_embedder.model.config.image_token_id


def test_instructions_and_templates(tiny_embedder):
    emb = copy.deepcopy(tiny_embedder)
    item = {"text": "a red circle", "image": None}
    builder = emb.input_builder
    assert builder.user_text(item, "query", None, 0) == "a red circle"
    assert builder.user_text(item, "query", "Find it", 0) == "Find it\na red circle"
    emb.config.target_instruction = "Represent the caption"
    assert builder.user_text(item, "target", None, 0) == "Represent the caption\na red circle"
    with torch.no_grad():
        plain = emb.encode([item])
        instructed = emb.encode([item], instructions=["Find me an image"])
    assert (plain - instructed).abs().max() > 1e-3


def test_prepare_rejects_bad_items(tiny_embedder, items):
    strict = copy.deepcopy(tiny_embedder)
    strict.config.placeholder_without_image = "error"
    with pytest.raises(ValueError, match="item 1 has an image placeholder in its text but no"):
        strict.prepare([items[0], {"text": "<|image_1|> hi", "image": None}])
    with pytest.raises(ValueError, match="item 0 has 2 image placeholders"):
        tiny_embedder.prepare([{"text": "<|image_1|> a <image>", "image": items[1]["image"]}])
    with pytest.raises(ValueError, match="item 0 has neither text nor image"):
        tiny_embedder.prepare([{"text": None, "image": None}])
    with pytest.raises(ValueError, match="role must be one of"):
        tiny_embedder.prepare(items, role="document")
    with pytest.raises(ValueError, match="instructions has 1 entries but items has 5"):
        tiny_embedder.prepare(items, instructions=["x"])
    from hardneg.data.images import ImageLoadError

    with pytest.raises(ImageLoadError, match="nope.png.*item 0"):
        tiny_embedder.prepare([{"text": None, "image": "/nonexistent/nope.png"}])


def test_encode_batches_match_one_by_one(tiny_embedder, items):
    tiny_embedder.train()
    batched = tiny_embedder.encode(items, batch_size=2, role="target")
    assert tiny_embedder.training, "encode must restore the training flag"
    tiny_embedder.eval()
    single = torch.cat([tiny_embedder.encode([it], batch_size=1, role="target") for it in items])
    assert batched.device.type == "cpu" and batched.shape == (len(items), 64)
    torch.testing.assert_close(batched, single, atol=ATOL, rtol=0)
    assert tiny_embedder.encode(items[:2], show_progress_bar=True).shape == (2, 64)


def test_save_load_round_trip(tiny_embedder, items, tmp_path):
    emb = copy.deepcopy(tiny_embedder)
    emb.config.padding_side = "right"
    emb.config.query_instruction = "Find the match"
    emb.config.target_template = "Target: {instruction}\n{text}"
    with torch.no_grad():
        for p in emb.parameters():
            p.add_(0.01 * torch.randn_like(p))  # not the seed-0 init: the weights must be loaded
    emb.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    saved = json.loads((tmp_path / "hardneg_embedder.json").read_text())
    assert saved["padding_side"] == "right" and saved["query_instruction"] == "Find the match"
    loaded = Embedder.from_pretrained(tmp_path)
    assert loaded.config == emb.config
    for role in ("query", "target"):
        torch.testing.assert_close(
            loaded.encode(items, role=role), emb.encode(items, role=role), atol=0, rtol=0
        )
    fresh = Embedder.tiny(seed=0).encode(items)
    assert (fresh - loaded.encode(items)).abs().max() > 1e-3


def test_from_pretrained_llava_hf_layout(tiny_embedder, items, tmp_path):
    """A llava-hf checkpoint folder (LlavaOnevisionProcessor, separate preprocessor_config.json,
    no hardneg_embedder.json) loads with the default config and gives the same embeddings."""
    tiny_embedder.save_pretrained(tmp_path)
    (tmp_path / "hardneg_embedder.json").unlink()
    proc_cfg = json.loads((tmp_path / "processor_config.json").read_text())
    image_cfg = proc_cfg.pop("image_processor")
    image_cfg["processor_class"] = "LlavaOnevisionProcessor"
    proc_cfg["processor_class"] = "LlavaOnevisionProcessor"
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(image_cfg))
    (tmp_path / "processor_config.json").write_text(json.dumps(proc_cfg))
    loaded = Embedder.from_pretrained(tmp_path)
    assert loaded.config.padding_side == "left"
    torch.testing.assert_close(loaded.encode(items), tiny_embedder.encode(items), atol=0, rtol=0)
    shutil.rmtree(tmp_path)


def _contrastive_loss(embedder, items):
    q = embedder(**embedder.prepare(items[:3], role="query"))
    t = embedder(**embedder.prepare(items[2:], role="target"))
    return hardneg.fused_hardneg_loss(q, t, mode="infonce")


def test_gradient_reaches_every_part(tiny_embedder, items):
    emb = copy.deepcopy(tiny_embedder).train()
    _contrastive_loss(emb, items).backward()
    parts = {"vision_tower": 0.0, "multi_modal_projector": 0.0, "language_model": 0.0}
    for name, p in emb.named_parameters():
        for part in parts:
            if f".{part}." in name and p.grad is not None:
                parts[part] += float(p.grad.abs().sum())
    assert all(v > 0 for v in parts.values()), parts
    # Freezing the vision tower really stops its gradient (the check above can fail).
    emb.zero_grad(set_to_none=True)
    emb.model.model.vision_tower.requires_grad_(False)
    _contrastive_loss(emb, items).backward()
    assert all(p.grad is None for p in emb.model.model.vision_tower.parameters())


def test_gradient_checkpointing_same_values_and_grads(tiny_embedder, items):
    plain = copy.deepcopy(tiny_embedder).train()
    ckpt = copy.deepcopy(tiny_embedder).train()
    ckpt.gradient_checkpointing_enable()
    assert ckpt.model.model.language_model.gradient_checkpointing
    losses = []
    for emb in (plain, ckpt):
        loss = _contrastive_loss(emb, items)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], atol=ATOL, rtol=0)
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters(), strict=True):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4, msg=name)


def test_bf16_model_gives_fp32_embeddings_close_to_fp32(tiny_embedder, items):
    emb = copy.deepcopy(tiny_embedder).to(torch.bfloat16)
    with torch.no_grad():
        out16 = emb.encode(items)
    out32 = tiny_embedder.encode(items)
    assert out16.dtype == torch.float32
    # bf16 keeps 8 mantissa bits (rel. step 2^-8 = 0.4%); a 2-layer model compounds a few such
    # roundings per unit vector component: cosine stays above 0.99 while unrelated inputs of this
    # random model sit far lower.
    cos = (out16 * out32).sum(-1)
    assert cos.min() > 0.99, cos


def test_lora_wrap_train_and_merged_save(tiny_embedder, items, tmp_path):
    emb = copy.deepcopy(tiny_embedder)
    before = emb.encode(items)
    emb.add_lora(r=4, alpha=8, dropout=0.0)
    trainable = [n for n, p in emb.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "language_model" in n for n in trainable)
    # lora_B starts at zero: the wrapped model embeds exactly like the original.
    torch.testing.assert_close(emb.encode(items), before, atol=0, rtol=0)
    emb.train()
    _contrastive_loss(emb, items).backward()
    grads = [p.grad for n, p in emb.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    with torch.no_grad():
        for n, p in emb.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    live = emb.encode(items)
    assert (live - before).abs().max() > 1e-3
    emb.save_pretrained(tmp_path)
    loaded = Embedder.from_pretrained(tmp_path)
    assert not any("lora" in n for n, _ in loaded.named_parameters())
    torch.testing.assert_close(loaded.encode(items), live, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="already wrapped"):
        emb.add_lora()


def test_tiny_is_deterministic_and_seeded():
    a, b, c = Embedder.tiny(seed=1), Embedder.tiny(seed=1), Embedder.tiny(seed=2)
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), n
    assert not torch.equal(
        a.model.model.multi_modal_projector.linear_1.weight,
        c.model.model.multi_modal_projector.linear_1.weight,
    )
    assert a.processor.tokenizer.get_vocab() == c.processor.tokenizer.get_vocab()
