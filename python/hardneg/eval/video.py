"""Zero-shot text-video retrieval (LLaVE, arXiv 2503.04812: MSR-VTT, MSVD) with R@1 / R@5 / R@10.

Frames are sampled uniformly from each video file with PyAV and given to the model as a
multi-image input: one image token per frame in a single user turn, which LLaVA-OneVision encodes
at base resolution per frame (transformers' multi-image path, batch_num_images > 1), so no video
processor (and no torchvision) is needed. Captions are embedded as text queries.

Annotations: MSR-VTT style, a .json list (or {"annotations": [...]}) or .jsonl of
{"video": file or id, "caption": str | [str, ...]}. A video named by id is looked up as
<video_root>/<id>{,.mp4,.avi,.webm,.mkv,.mov}. Every caption is a text->video query; a video's
video->text hit counts when any of its captions is within the top K.

Legend: T captions, V distinct videos, F frames per video, D embedding dim.

    python -m hardneg.eval.video --model CKPT --annotations msrvtt_test_1k.json \
        --video-root MSRVTT/videos --output out/msrvtt.json
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from hardneg.eval.cache import EmbeddingCache, ImageDigests, model_fingerprint
from hardneg.eval.mmeb import embed_items

VIDEO_EXTENSIONS = ("", ".mp4", ".avi", ".webm", ".mkv", ".mov")
# MMEB-V2's video retrieval prompts (VLM2Vec-V2): caption queries, video targets.
TEXT_INSTRUCTION = "Find a video that contains the following visual content:"
VIDEO_INSTRUCTION = "Understand the content of the provided video."
# MMEB-V2 uses 8 frames per video; LLaVE's MSR-VTT numbers use up to 32.
NUM_FRAMES = 8
RECALL_KS = (1, 5, 10)


def sample_frames(path: str | os.PathLike, num_frames: int = NUM_FRAMES) -> list[Image.Image]:
    """`num_frames` RGB frames at the centres of `num_frames` equal segments of the video (all
    frames, repeated as needed, when it is shorter). Decodes the first video stream once."""
    import av

    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    try:
        container = av.open(os.fspath(path))
    except (av.error.FFmpegError, OSError) as err:
        raise ValueError(f"cannot open video {os.fspath(path)!r}: {err}") from err
    with container:
        if not container.streams.video:
            raise ValueError(f"video {os.fspath(path)!r} has no video stream")
        frames = [f.to_image() for f in container.decode(video=0)]
    if not frames:
        raise ValueError(f"video {os.fspath(path)!r} has no decodable frame")
    n = len(frames)
    return [frames[min(n - 1, int((i + 0.5) * n / num_frames))] for i in range(num_frames)]


def load_annotations(
    path: str | os.PathLike, *, video_root: str | os.PathLike | None = None
) -> tuple[list[str], list[str], list[int]]:
    """(video paths (V), captions (T), caption_video (T) index of each caption's video)."""
    path = Path(path)
    with open(path) as f:
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in f if line.strip()]
        else:
            rows = json.load(f)
    if isinstance(rows, dict):
        rows = rows.get("annotations", rows.get("data"))
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"annotations {str(path)!r}: expected a non-empty list of rows")
    root = Path(video_root) if video_root is not None else path.parent
    videos, captions, caption_video, index = [], [], [], {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or "video" not in row or "caption" not in row:
            raise ValueError(f"annotations {str(path)!r} row {i}: needs 'video' and 'caption'")
        name = str(row["video"])
        if name not in index:
            found = next(
                (
                    p
                    for ext in VIDEO_EXTENSIONS
                    for p in [Path(name + ext) if os.path.isabs(name) else root / (name + ext)]
                    if p.is_file()
                ),
                None,
            )
            if found is None:
                raise ValueError(
                    f"annotations {str(path)!r} row {i}: video {name!r} not under {root}"
                )
            index[name] = len(videos)
            videos.append(str(found))
        texts = row["caption"] if isinstance(row["caption"], list) else [row["caption"]]
        for text in texts:
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"annotations {str(path)!r} row {i}: empty caption")
            captions.append(text)
            caption_video.append(index[name])
    return videos, captions, caption_video


def video_inputs(
    embedder, frames: Sequence[Sequence[Image.Image]], instruction: str = VIDEO_INSTRUCTION
) -> dict[str, Tensor]:
    """Model inputs for a batch of videos as multi-image prompts: F image tokens, then the
    instruction, inside the embedder's chat template (its target template and padding side)."""
    processor, config = embedder.processor, embedder.config
    token = processor.image_token
    texts = []
    for clip in frames:
        message = config.target_template.format(instruction=instruction, text="").strip()
        message = "\n".join([token] * len(clip) + ([message] if message else []))
        conversation = [{"role": "user", "content": [{"type": "text", "text": message}]}]
        owner = processor if processor.chat_template else processor.tokenizer
        texts.append(
            owner.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=config.add_generation_prompt
            )
        )
    processor.tokenizer.padding_side = config.padding_side
    batch = processor(
        text=texts,
        images=[[f.convert("RGB") for f in clip] for clip in frames],
        padding=True,
        return_tensors="pt",
    )
    return {k: v for k, v in batch.items() if isinstance(v, Tensor)}


class VideoEncoder:
    """Embedder.encode for video items {"text": "<video:F>", "image": video path}: what
    mmeb.embed_items calls, so videos get the same cache and rank sharding as MMEB items."""

    def __init__(self, embedder, num_frames: int = NUM_FRAMES):
        self.embedder = embedder
        self.num_frames = num_frames

    @torch.no_grad()
    def encode(
        self, items, role="target", batch_size=8, show_progress_bar=False, instructions=None
    ):
        out = []
        device = self.embedder.device
        for b0 in range(0, len(items), batch_size):
            batch = items[b0 : b0 + batch_size]
            instruction = instructions[b0] if instructions else VIDEO_INSTRUCTION
            frames = [sample_frames(it["image"], self.num_frames) for it in batch]
            inputs = video_inputs(self.embedder, frames, instruction)
            out.append(self.embedder(**{k: v.to(device) for k, v in inputs.items()}).cpu())
        return torch.cat(out)


def recall_at_k(sim_TV: Tensor, caption_video_T: Tensor, ks: Sequence[int] = RECALL_KS) -> dict:
    """R@K (percent) and median rank, both directions. A query's rank is 1 + the number of items
    scoring strictly higher than its best correct one (ties resolve in its favour, as P@1 does)."""
    T, V = sim_TV.shape
    correct_TV = torch.zeros(T, V, dtype=torch.bool)
    correct_TV[torch.arange(T), caption_video_T] = True

    def ranks(sim_QC: Tensor, correct_QC: Tensor) -> Tensor:
        best_Q = sim_QC.masked_fill(~correct_QC, float("-inf")).max(dim=1).values
        return 1 + (sim_QC > best_Q[:, None]).sum(dim=1)

    out = {}
    for name, s, c in (
        ("text_to_video", sim_TV, correct_TV),
        ("video_to_text", sim_TV.T, correct_TV.T),
    ):
        r = ranks(s.double(), c)
        out[name] = {f"R@{k}": float((r <= k).double().mean() * 100) for k in ks}
        out[name]["median_rank"] = float(r.double().median())
        out[name]["num_queries"] = int(r.numel())
    return out


def evaluate_video_retrieval(
    embedder,
    annotations: str | os.PathLike,
    *,
    video_root: str | os.PathLike | None = None,
    num_frames: int = NUM_FRAMES,
    batch_size: int = 8,
    cache_dir: str | os.PathLike | None = None,
    text_instruction: str = TEXT_INSTRUCTION,
    video_instruction: str = VIDEO_INSTRUCTION,
    group=None,
    show_progress_bar: bool = True,
) -> dict | None:
    """R@1/5/10 both ways on an annotation file; rank 0 returns the metrics, other ranks None."""
    videos, captions, caption_video = load_annotations(annotations, video_root=video_root)
    fingerprint = model_fingerprint(embedder)
    name = f"video-{Path(annotations).stem}"
    cache = EmbeddingCache(cache_dir, dataset=name, fingerprint=fingerprint)
    digests = ImageDigests()
    common = dict(cache=cache, digests=digests, group=group, show_progress_bar=show_progress_bar)
    video_items = [{"text": f"<video:{num_frames}>", "image": v} for v in videos]
    v_VD = embed_items(
        VideoEncoder(embedder, num_frames),
        video_items,
        [video_instruction] * len(videos),
        role="target",
        batch_size=batch_size,
        desc="videos",
        **common,
    )
    t_TD = embed_items(
        embedder,
        [{"text": c, "image": None} for c in captions],
        [text_instruction or None] * len(captions),
        role="query",
        batch_size=max(batch_size, 32),
        desc="captions",
        **common,
    )
    if t_TD is None:
        return None
    metrics = recall_at_k(t_TD @ v_VD.T, torch.tensor(caption_video))
    metrics.update(num_videos=len(videos), num_captions=len(captions), num_frames=num_frames)
    return metrics


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Zero-shot text-video retrieval (R@1/5/10).")
    p.add_argument("--model", required=True, help='Embedder checkpoint, or "tiny[:SEED]"')
    p.add_argument("--annotations", required=True, help=".json/.jsonl of {video, caption}")
    p.add_argument("--video-root", default=None, help="default: the annotation file's folder")
    p.add_argument("--num-frames", type=int, default=NUM_FRAMES)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    from hardneg.models import Embedder

    if args.model == "tiny" or args.model.startswith("tiny:"):
        embedder = Embedder.tiny(seed=int(args.model.partition(":")[2] or 0))
    else:
        embedder = Embedder.from_pretrained(args.model)
    if torch.cuda.is_available():
        embedder = embedder.to("cuda", dtype=torch.bfloat16)
    metrics = evaluate_video_retrieval(
        embedder,
        args.annotations,
        video_root=args.video_root,
        num_frames=args.num_frames,
        batch_size=args.batch_size,
        cache_dir=args.cache_dir,
    )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
