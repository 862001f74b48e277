"""Text-video retrieval: uniform frame sampling (PyAV), R@K by hand, the tiny model end to end."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest
import torch
from hardneg.eval.video import (
    VideoEncoder,
    evaluate_video_retrieval,
    load_annotations,
    recall_at_k,
    sample_frames,
    video_inputs,
)

SIZE = (32, 48)  # H, W


def write_video(path, colour, num_frames=12, *, level_by_index=False, fps=8):
    """A short mpeg4 clip: a coloured background and a white square moving right. With
    level_by_index the whole frame is grey level 10 * index instead (to read indices back)."""
    container = av.open(str(path), "w")
    stream = container.add_stream("mpeg4", rate=fps)
    stream.height, stream.width = SIZE
    stream.pix_fmt = "yuv420p"
    for i in range(num_frames):
        a = np.zeros((*SIZE, 3), np.uint8)
        if level_by_index:
            a[:] = 10 * i
        else:
            a[:] = colour
            x = (4 * i) % (SIZE[1] - 8)
            a[12:20, x : x + 8] = 255
        for packet in stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return str(path)


def _index_of(frame) -> int:
    return round(float(np.asarray(frame, dtype=np.float64).mean()) / 10)


def test_frames_are_sampled_uniformly(tmp_path):
    path = write_video(tmp_path / "ramp.mp4", None, num_frames=20, level_by_index=True)
    frames = sample_frames(path, 4)
    assert [f.size for f in frames] == [(SIZE[1], SIZE[0])] * 4
    # Centres of 4 equal segments of 20 frames: 2.5, 7.5, 12.5, 17.5 -> 2, 7, 12, 17.
    assert [_index_of(f) for f in frames] == [2, 7, 12, 17]
    # Shorter than asked: frames repeat, in order.
    short = write_video(tmp_path / "short.mp4", None, num_frames=3, level_by_index=True)
    assert [_index_of(f) for f in sample_frames(short, 6)] == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="num_frames must be >= 1, got 0"):
        sample_frames(path, 0)
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(ValueError, match="cannot open video"):
        sample_frames(tmp_path / "bad.mp4", 2)


def test_recall_matches_hand_computation():
    # 4 captions, 3 videos; caption 3 is a second caption of video 0.
    sim_TV = torch.tensor(
        [
            [0.9, 0.1, 0.2],  # video 0: rank 1
            [0.5, 0.4, 0.3],  # video 1: rank 2
            [0.8, 0.7, 0.1],  # video 2: rank 3
            [0.2, 0.3, 0.4],  # video 0: rank 3
        ]
    )
    m = recall_at_k(sim_TV, torch.tensor([0, 1, 2, 0]), ks=(1, 2, 10))
    assert m["text_to_video"]["R@1"] == 25.0
    assert m["text_to_video"]["R@2"] == 50.0
    assert m["text_to_video"]["R@10"] == 100.0
    assert m["text_to_video"]["median_rank"] == 2.0  # lower median of (1, 2, 3, 3)
    # video 0: its best caption (0, 0.9) is top; video 1: caption 1 (0.4) is beaten by 0.7 and
    # 0.3 is lower -> rank 2; video 2: caption 2 (0.1) is beaten by 0.2, 0.3, 0.4 -> rank 4.
    assert m["video_to_text"]["R@1"] == pytest.approx(100 / 3)
    assert m["video_to_text"]["R@2"] == pytest.approx(200 / 3)
    assert m["video_to_text"]["num_queries"] == 3
    perfect = recall_at_k(torch.eye(3), torch.arange(3))
    assert perfect["text_to_video"]["R@1"] == perfect["video_to_text"]["R@1"] == 100.0


def _write_set(tmp_path):
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (150, 30, 180)]
    names = ["red", "green", "blue", "yellow", "purple"]
    rows = []
    for i, (c, n) in enumerate(zip(colours, names, strict=True)):
        write_video(tmp_path / "videos" / f"video{i}.mp4", c, num_frames=6 + i)
        rows.append({"video": f"video{i}", "caption": [f"a white square moves over {n}"]})
    rows[0]["caption"].append("a square on red")
    ann = tmp_path / "test.json"
    ann.write_text(json.dumps(rows))
    return ann


@pytest.fixture(scope="module")
def tiny():
    from hardneg.models.embedder import Embedder

    return Embedder.tiny(seed=0)


def test_tiny_model_end_to_end(tmp_path, tiny):
    (tmp_path / "videos").mkdir()
    ann = _write_set(tmp_path)
    videos, captions, caption_video = load_annotations(ann, video_root=tmp_path / "videos")
    assert len(videos) == 5 and len(captions) == 6 and caption_video == [0, 0, 1, 2, 3, 4]
    cache = tmp_path / "cache"
    metrics = evaluate_video_retrieval(
        tiny, ann, video_root=tmp_path / "videos", num_frames=4, batch_size=2, cache_dir=cache
    )
    assert metrics["num_videos"] == 5 and metrics["num_captions"] == 6
    assert metrics["text_to_video"]["R@10"] == 100.0  # only 5 videos

    # The same numbers computed directly: frames -> multi-image prompt -> embedder.
    with torch.no_grad():
        v_VD = torch.cat(
            [tiny(**video_inputs(tiny, [sample_frames(v, 4)])) for v in videos]
        )  # one video per batch: other padding than the evaluation's batches of 2
    t_TD = tiny.encode(
        [{"text": c, "image": None} for c in captions],
        instructions=["Find a video that contains the following visual content:"] * 6,
    )
    direct = recall_at_k(t_TD @ v_VD.T, torch.tensor(caption_video))
    for direction in ("text_to_video", "video_to_text"):
        for k in ("R@1", "R@5", "median_rank"):
            assert metrics[direction][k] == direct[direction][k], (direction, k)

    # A second run embeds nothing: every video and caption comes from the cache.
    def refuse(*args, **kwargs):
        raise AssertionError("embedded again")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(VideoEncoder, "encode", refuse)
        mp.setattr(tiny, "encode", refuse)
        again = evaluate_video_retrieval(
            tiny, ann, video_root=tmp_path / "videos", num_frames=4, cache_dir=cache
        )
    assert again["text_to_video"] == metrics["text_to_video"]


def test_bad_annotations_are_named(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"video": "nope", "caption": "x"}) + "\n")
    with pytest.raises(ValueError, match="row 0: video 'nope' not under"):
        load_annotations(tmp_path / "a.jsonl")
    write_video(tmp_path / "v.mp4", (10, 10, 10), num_frames=2)
    (tmp_path / "b.json").write_text(json.dumps([{"video": "v", "caption": " "}]))
    with pytest.raises(ValueError, match="row 0: empty caption"):
        load_annotations(tmp_path / "b.json")
