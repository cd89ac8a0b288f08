"""Tests for data.py below the masking section: decoding, manifests, collation, mixing, bad rows, the toy world.

Everything runs on real files written here (H.264 MP4 with AAC, JPEG, WAV, FLAC) on the CPU.
"""
import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
import shutil

import av
import numpy as np
import pytest
import soundfile
import torch

import data
import pipeline.commands
import pipeline.loader
import pipeline.manifest
import pipeline.media
import pipeline.sampler
import pipeline.targets
import pipeline.text
import pipeline.toy

CFG = data.TOY_DATA


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("toy"))
    pipeline.toy.make_toy(out, seed=0, size="tiny")
    return out


@pytest.fixture(scope="module")
def tok(toy):
    return pipeline.text.load_tokenizer(os.path.join(toy, "tokenizer.json"))


def _write_manifest(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def _grey_clip(path, n=40, fps=10, keyint=5, audio=None, sr=16000, preset="ultrafast", fmt="mp4"):
    """Frame f is a uniform grey of level 5 * f + 20, so a decoded frame tells its index."""
    frames = np.stack([np.full((48, 64, 3), 5 * f + 20, np.uint8) for f in range(n)])
    pipeline.media.write_mp4(str(path), frames, fps, audio, sr, keyint=keyint, preset=preset, fmt=fmt)
    return str(path)


def _frame_index(img):
    return int(round((img.astype(float).mean() - 20) / 5))


# ----------------------------------------------------------------------------------------------------
# Video

# veryfast has B-frames (decode order != display order); MPEG-TS and FLV seek by byte position and may land
# after the target (frames_at then seeks further back)
@pytest.mark.parametrize("preset, fmt", [("ultrafast", "mp4"), ("veryfast", "mp4"), ("veryfast", "mpegts"),
                                         ("ultrafast", "flv")])
def test_seek_matches_decoding_everything(tmp_path, preset, fmt):
    path = _grey_clip(tmp_path / "g.vid", n=40, fps=10, keyint=5, preset=preset, fmt=fmt)  # 4 s, keyframe every 0.5 s
    for start, end in [(None, None), (1.3, 3.7), (2.95, 3.05), (0.0, 0.4), (3.0, 4.0), (2.0, 10.0)]:
        a = pipeline.media.read_video(path, 4, 32, start, end, seek=True)
        b = pipeline.media.read_video(path, 4, 32, start, end, seek=False)
        assert np.array_equal(a, b), (start, end)
        s, e = start or 0.0, min(end or 4.0, 4.0)                 # an end past the file: the file's end
        want = [int((s + (i + 0.5) * (e - s) / 4) * 10 + 1e-6) for i in range(4)]  # frame on display at t
        assert [_frame_index(x) for x in a] == want, (start, end)


def test_short_clip_repeats_frames_and_bad_ranges(tmp_path):
    path = _grey_clip(tmp_path / "short.mp4", n=2, fps=10)  # 0.2 s, 2 frames, asked for 8
    v = pipeline.media.read_video(path, 8, 32)
    assert v.shape == (8, 32, 32, 3)
    assert [_frame_index(x) for x in v] == [0, 0, 0, 0, 1, 1, 1, 1]
    with pytest.raises(pipeline.media.BadExample, match="clip starts"):
        pipeline.media.read_video(path, 4, 32, start=5.0, end=6.0)


def test_rotated_video_is_upright(tmp_path):
    img = np.zeros((64, 80, 3), np.uint8)
    img[:, :40] = (220, 30, 30)   # left half red
    img[:, 40:] = (30, 30, 220)   # right half blue
    img[:12] = (30, 200, 30)      # top strip green
    frames = np.stack([img] * 6)
    pipeline.media.write_mp4(str(tmp_path / "up.mp4"), frames, 10)
    # a phone stores the sensor's orientation and a display matrix turning it upright
    pipeline.media.write_mp4(str(tmp_path / "rot.mp4"), np.rot90(frames, k=-1, axes=(1, 2)), 10, rotation=90)
    up = pipeline.media.read_video(str(tmp_path / "up.mp4"), 2, 64).astype(float)
    rot = pipeline.media.read_video(str(tmp_path / "rot.mp4"), 2, 64).astype(float)
    assert np.abs(up - rot).mean() < 6
    assert rot[0, 40, 10, 0] > 150 and rot[0, 40, 60, 2] > 150 and rot[0, 2, 32, 1] > 150


def test_legacy_rotate_tag_is_applied(tmp_path):
    """Before display matrices, FFmpeg wrote a clockwise `rotate` tag on the stream (Matroska keeps it as
    ROTATE; FFmpeg looks tags up ignoring case). A file with only the tag is turned upright as well."""
    img = np.zeros((64, 80, 3), np.uint8)
    img[:, :40] = (220, 30, 30)   # left half red
    img[:, 40:] = (30, 30, 220)   # right half blue
    img[:12] = (30, 200, 30)      # top strip green
    frames = np.stack([img] * 6)
    pipeline.media.write_mp4(str(tmp_path / "up.mkv"), frames, 10, fmt="matroska")
    pipeline.media.write_mp4(str(tmp_path / "tag.mkv"), np.rot90(frames, k=1, axes=(1, 2)), 10, fmt="matroska",
                    metadata={"rotate": "90"})
    with av.open(str(tmp_path / "tag.mkv")) as c:  # only the tag: no display matrix for PyAV to report
        assert next(c.decode(video=0)).rotation == 0 and c.streams.video[0].metadata.get("ROTATE") == "90"
    up = pipeline.media.read_video(str(tmp_path / "up.mkv"), 2, 64).astype(float)
    rot = pipeline.media.read_video(str(tmp_path / "tag.mkv"), 2, 64).astype(float)
    assert np.abs(up - rot).mean() < 6
    pipeline.media.write_mp4(str(tmp_path / "bad.mkv"), frames, 10, fmt="matroska", metadata={"rotate": "sideways"})
    with pytest.raises(pipeline.media.BadExample, match=r"unreadable rotate tag: 'sideways' in .*bad\.mkv"):
        pipeline.media.read_video(str(tmp_path / "bad.mkv"), 2, 64)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_jpeg_exif_orientation_is_applied(tmp_path, orientation):
    """A phone photo stores the sensor's pixels and an EXIF Orientation tag saying how to show them;
    read_image shows every one of the eight upright (the mirrored ones too)."""
    img = np.zeros((64, 80, 3), np.uint8)
    img[:, :40] = (220, 30, 30)   # left half red
    img[:, 40:] = (30, 30, 220)   # right half blue
    img[:12] = (30, 200, 30)      # top strip green
    inverse = {6: 8, 8: 6}.get(orientation, orientation)  # the others undo themselves
    stored = np.ascontiguousarray(pipeline.media.EXIF_ORIENT[inverse](img))
    pipeline.media.write_jpeg(str(tmp_path / "up.jpg"), img)
    pipeline.media.write_jpeg(str(tmp_path / "sensor.jpg"), stored)
    raw = open(tmp_path / "sensor.jpg", "rb").read()
    tiff = b"II*\x00" + (8).to_bytes(4, "little") + (1).to_bytes(2, "little")  # IFD0 with one entry:
    tiff += bytes.fromhex("1201 0300 01000000") + orientation.to_bytes(2, "little") + bytes(6)  # 0x0112 SHORT
    app1 = b"Exif\x00\x00" + tiff
    (tmp_path / "exif.jpg").write_bytes(raw[:2] + b"\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1 + raw[2:])
    assert pipeline.media.jpeg_orientation(str(tmp_path / "exif.jpg")) == orientation
    assert pipeline.media.jpeg_orientation(str(tmp_path / "up.jpg")) is None
    up = pipeline.media.read_image(str(tmp_path / "up.jpg"), 1, 64).astype(float)
    exif = pipeline.media.read_image(str(tmp_path / "exif.jpg"), 1, 64).astype(float)
    plain = pipeline.media.read_image(str(tmp_path / "sensor.jpg"), 1, 64).astype(float)
    assert np.abs(up - exif).mean() < 6
    assert (np.abs(up - plain).mean() > 40) == (orientation != 1)


def test_odd_resolution_and_image(tmp_path):
    rng = np.random.default_rng(0)
    pipeline.media.write_mp4(str(tmp_path / "odd.mp4"), rng.integers(0, 255, (5, 61, 97, 3), dtype=np.uint8), 10,
                    pix_fmt="yuv444p")
    assert pipeline.media.read_video(str(tmp_path / "odd.mp4"), 4, 64).shape == (4, 64, 64, 3)
    img = np.zeros((50, 90, 3), np.uint8)
    img[:, 45:] = 200
    pipeline.media.write_jpeg(str(tmp_path / "a.jpg"), img)
    v = pipeline.media.read_image(str(tmp_path / "a.jpg"), 4, 32)
    assert v.shape == (4, 32, 32, 3) and all(np.array_equal(v[0], x) for x in v)
    assert v[0, :, :10].mean() < 20 and v[0, :, -10:].mean() > 180  # centre crop keeps both halves


def test_collate_masks_images_in_every_frame_and_videos_with_a_tube(tmp_path, tok):
    """collate gives an image row (a static clip) one 2D mask on all of its frames and keeps appendix A.1's
    tube for video rows: their lengths spread over [ceil(T/2), T]. Then end to end: on an image batch from a
    manifest, every masked token cell is hidden in every frame of the encoder's input (the Video Swin patch
    mask), while the target ids, computed by the model's own tokenizer, are the same in every frame: a frame
    left visible would hand the encoder the answer."""
    from icode import ICode, preset
    from data import tube_to_patch_mask
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        pipeline.media.write_jpeg(str(tmp_path / f"{i}.jpg"), rng.integers(0, 255, (64, 80, 3), dtype=np.uint8))
        rows.append({"image": f"{i}.jpg", "text": "a red circle"})
    ds = pipeline.manifest.ManifestDataset(_write_manifest(tmp_path / "img.jsonl", rows), CFG, tok)
    examples = [ds[i] for i in range(len(ds))]
    assert all(e["static"] for e in examples)
    T, h = CFG.frames, CFG.image_size // CFG.token_patch
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        m = data.collate(examples, CFG, tok, g)["video_mask"]                    # [B, T, h, w]
        assert all(m[b, 0].any() and all(torch.equal(m[b, t], m[b, 0]) for t in range(T)) for b in range(len(m)))
    video = {k: v for k, v in examples[0].items() if k != "static"}            # the same clip as a video row
    lengths = {int(data.collate([video] * 8, CFG, tok, g)["video_mask"][b].flatten(1).any(1).sum())
               for _ in range(20) for b in range(8)}
    assert lengths == set(range(math.ceil(T / 2), T + 1)), lengths
    batch = data.collate(examples, CFG, tok, g)
    model = ICode(preset("tiny", text_vocab=tok.vocab_size))
    ids = model.targets(batch)["video"]                                         # -100 where not masked
    full = model.video_tokenizer(batch["video"])                                # [B, T, h, w] every cell's id
    assert all(torch.equal(full[:, t], full[:, 0]) for t in range(T))           # identical frames, identical ids
    patch = tube_to_patch_mask(batch["video_mask"])                             # [B, T/2, H/4, W/4]
    seen = ~patch.reshape(len(examples), T // 2, h, 4, h, 4).all(5).all(3)      # [B, T/2, h, w] cell visible
    masked = (ids != -100).any(1)                                               # [B, h, w] a masked cell
    assert masked.any() and not (seen & masked[:, None]).any()


# ----------------------------------------------------------------------------------------------------
# Audio

def _sine(sr, seconds, hz=440.0, channels=1):
    t = np.arange(int(sr * seconds)) / sr
    x = (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)
    return np.stack([x] * channels, 1)


def _peak_hz(x, sr=16000):
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.argmax(spec) * sr / len(x)


@pytest.mark.parametrize("sr,channels,fmt", [(44100, 2, "WAV"), (8000, 1, "WAV"), (48000, 2, "FLAC"), (16000, 1, "WAV")])
def test_resampling_keeps_duration_and_pitch(tmp_path, sr, channels, fmt):
    path = str(tmp_path / f"a.{fmt.lower()}")
    soundfile.write(path, _sine(sr, 1.5, 440, channels), sr, format=fmt)
    x = pipeline.media.read_audio(path, 16000)
    assert abs(len(x) - 24000) <= 2 and x.dtype == np.float32
    assert abs(_peak_hz(x) - 440) < 3
    cut = pipeline.media.read_audio(path, 16000, start=0.25, end=1.0)
    assert abs(len(cut) - 12000) <= 2


@pytest.mark.parametrize("fmt", ["WAV", "FLAC"])
def test_cut_and_mixdown_of_a_sound_file_are_exact(tmp_path, fmt):
    """At 16 kHz nothing is resampled: [start, start + max_s) of the file, the mean of its two channels (two
    different tones, so neither channel alone passes), also when start lies beyond max_s."""
    sr = 16000
    t = np.arange(10 * sr) / sr
    x = 0.3 * np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 1000 * t)], 1)
    path = str(tmp_path / f"two.{fmt.lower()}")
    soundfile.write(path, x, sr, format=fmt)
    raw, _ = soundfile.read(path, dtype="float32")                           # [N, 2] as stored
    y = pipeline.media.read_audio(path, sr, start=5.0, end=9.0, max_s=2.0)
    assert len(y) == 2 * sr
    np.testing.assert_allclose(y, raw[5 * sr:7 * sr].mean(1), atol=1e-6)


def test_audio_from_video_container(tmp_path):
    wave = _sine(48000, 2.0, 300, 2).T.copy()  # [2, N] stereo 48 kHz AAC
    path = _grey_clip(tmp_path / "av.mp4", n=20, audio=wave, sr=48000)
    x = pipeline.media.read_audio(path, 16000)
    assert abs(len(x) - 32000) <= 160 and abs(_peak_hz(x) - 300) < 3
    cut = pipeline.media.read_audio(path, 16000, start=0.5, end=1.5)
    assert abs(len(cut) - 16000) <= 2
    assert len(pipeline.media.read_audio(path, 16000, max_s=1.2)) == 19200
    # decoding stops at max_s (a row without `end` in a long file), with the samples a full decode gives
    head = pipeline.media._read_audio_av(path, 16000, 0.5, None, max_s=0.5)
    assert 8000 <= len(head) < 8000 + 1600                      # 0.5 s, and at most ~2 AAC frames more
    assert np.array_equal(head[:8000], pipeline.media.read_audio(path, 16000, start=0.5)[:8000])
    with pytest.raises(pipeline.media.BadExample, match="no audio stream"):
        pipeline.media.read_audio(_grey_clip(tmp_path / "mute.mp4", n=5), 16000)


@pytest.mark.parametrize("fmt, start_s", [("mp4", 0.0), ("mpegts", 0.0), ("flv", 0.0), ("matroska", 0.0),
                                          ("mpegts", 10.0)])
def test_picture_and_sound_of_one_file_stay_in_sync(tmp_path, fmt, start_s):
    """A click in the sound and a bright frame at the same moments (1, 2, 3 s) land at the same clip times,
    whatever the container: MPEG-TS and FLV start the video 64 ms after the audio, so with each stream
    measured from its own start the clicks came 64 ms late there (1.064 s; MP4 and Matroska 1.000 s). Also
    when the file's timestamps start at 10 s (a cut recording): `start` / `end` count from the file's start."""
    sr = 16000
    x = np.zeros(4 * sr, np.float32)
    for c in (1.0, 2.0, 3.0):
        x[int(c * sr):int(c * sr) + 64] = 0.8
    frames = np.stack([np.full((48, 64, 3), 200 if f in (10, 20, 30) else 20, np.uint8) for f in range(40)])
    path = str(tmp_path / f"sync.{fmt}")
    pipeline.media.write_mp4(path, frames, 10, x[None], sr, fmt=fmt, start_s=start_s)
    manifest = tmp_path / "sync.jsonl"
    manifest.write_text(json.dumps({"video": path, "start": 0.5, "end": 2.5}) + "\n")
    y = pipeline.manifest.ManifestDataset(str(manifest), data.TOY_DATA)[0]["audio"]          # the loader's own path
    assert len(y) == 2 * sr
    clicks = np.flatnonzero(np.abs(y) > 0.3)
    first_click = 0.5 + clicks[0] / sr
    v = pipeline.media.read_video(path, 20, 32, start=0.5, end=2.5)          # frame centres 0.55, 0.65, ..., 2.45
    bright = [0.5 + (i + 0.5) * 0.1 for i in range(20) if v[i].mean() > 100]
    assert abs(first_click - 1.0) < 0.005, first_click             # measured: 1.000 in all four
    assert abs(bright[0] - 1.05) < 1e-6, bright                    # the frame on display from 1.0 s


# ----------------------------------------------------------------------------------------------------
# Manifests, every field combination, collation

COMBOS = [  # row fields -> modalities
    (dict(video="video/000000.mp4", text="a red circle", caption="caption here"), ("video", "text", "audio")),
    (dict(video="video/000000.mp4"), ("video", "audio")),
    (dict(video="video/000000.mp4", text="a red circle", mute=True), ("video", "text")),
    (dict(video="video/000000.mp4", start=0.5, end=1.5, text="clip"), ("video", "text", "audio")),
    (dict(video="video/000000.mp4", audio="speech_text/000002.wav"), ("video", "audio")),
    (dict(image="image_text/000000.jpg", text="a red circle"), ("video", "text")),
    (dict(image="image_text/000000.jpg", audio="speech_text/000000.flac"), ("video", "audio")),
    (dict(audio="speech_text/000001.wav", text="left orange"), ("text", "audio")),
    (dict(image="image_text/000000.jpg", caption="only a caption"), ("video", "text")),
    (dict(text="just text", label=1), ("text",)),
]


@pytest.mark.parametrize("row,mods", COMBOS)
def test_every_field_combination(toy, tok, row, mods):
    path = _write_manifest(os.path.join(toy, "combo.jsonl"), [row, row])
    ds = pipeline.manifest.ManifestDataset(path, CFG, tok)
    assert ds.modalities == mods and ds.name == "combo"
    b = data.collate([ds[0], ds[1]], CFG, tok, torch.Generator().manual_seed(0))
    keys = {"video": {"video", "video_mask"}, "text": {"text_ids", "text_ids_clean", "text_attention", "text_labels"},
            "audio": {"audio", "audio_attention", "audio_mask"}}
    for m, ks in keys.items():
        assert (ks <= set(b)) == (m in mods) and (not ks & set(b)) == (m not in mods)
    assert b["modalities"] == mods and b["source"] == "combo" and b["index"] == [("combo", 1), ("combo", 2)]
    if "video" in mods:
        assert b["video"].shape == (2, 3, CFG.frames, 64, 64) and b["video_mask"].shape == (2, CFG.frames, 4, 4)
        u8 = torch.from_numpy(ds[0]["video"]).permute(3, 0, 1, 2).float()         # [3, T, H, W] 0..255
        want = (u8 / 255 - torch.tensor(CFG.mean).view(3, 1, 1, 1)) / torch.tensor(CFG.std).view(3, 1, 1, 1)
        torch.testing.assert_close(b["video"][0], want, atol=1e-5, rtol=1e-5)   # ImageNet mean / std per channel
    if "audio" in mods:
        n = b["audio"].shape[1]
        want = int(round(((row.get("end") or 2.0) - (row.get("start") or 0.0)) * 16000))
        assert n == want and b["audio_attention"].all()
        assert b["audio_mask"].shape == (2, int(data.speech_frames(n)))
    if "text" in mods:
        ids = b["text_ids_clean"]
        assert ids[:, 0].eq(tok.cls_id).all()
        if "caption" in row and "text" in row:  # section 4.2.2: caption and transcript joined
            assert (ids[0] == tok.sep_id).sum() == 2
    if "label" in row:
        assert b["labels"]["label"].tolist() == [1, 1]


def test_collate_masks_respect_padding_and_specials(toy, tok):
    ds = pipeline.manifest.ManifestDataset(os.path.join(toy, "speech_text.jsonl"), CFG, tok)
    exs = [ds[i] for i in range(len(ds))]
    exs[0]["audio"] = exs[0]["audio"][:5000]  # one short row: padding must never be masked
    b = data.collate(exs, CFG, tok, torch.Generator().manual_seed(1))
    frames = [int(data.speech_frames(len(e["audio"]))) for e in exs]
    for i, n in enumerate(frames):
        assert not b["audio_mask"][i, n:].any() and b["audio_mask"][i, :n].any()
        assert b["audio_attention"][i].sum() == len(exs[i]["audio"])
    lab, ids, clean = b["text_labels"], b["text_ids"], b["text_ids_clean"]
    special = ~b["text_attention"] | torch.isin(clean, torch.tensor(tok.special_ids))
    assert not (lab != -100)[special].any()
    assert torch.equal(lab[lab != -100], clean[lab != -100])
    assert torch.equal(ids[lab == -100], clean[lab == -100])
    # the model's input is the corrupted text: most selected tokens are [MASK] (80% of them in expectation;
    # mask_tokens' statistics are tested in test_masking.py), not the clean ids
    big = data.collate(exs * 10, CFG, tok, torch.Generator().manual_seed(2))
    sel = big["text_labels"] != -100
    assert sel.sum() >= 20 and (big["text_ids"][sel] == tok.mask_id).float().mean() >= 0.6


def test_collate_draws_each_mask_with_its_own_setting(toy, tok):
    """Ratios unlike the defaults and unlike each other, each visible in its own mask: MLM selects ~20% of the
    eligible tokens; the tube masks round(0.75 * 16) = 12 of a frame's 16 cells; spans of 4 frames started
    at 3% of the frames cover ~11% (~1 - 0.97^4; the defaults give ~57%)."""
    cfg = dataclasses.replace(CFG, text_mask_ratio=0.2, tube_ratio=0.75, span_p=0.03, span_len=4)
    ds = pipeline.manifest.ManifestDataset(os.path.join(toy, "video.jsonl"), cfg, tok)
    b = data.collate([ds[i] for i in range(len(ds))] * 20, cfg, tok, torch.Generator().manual_seed(0))
    eligible = b["text_attention"] & ~torch.isin(b["text_ids_clean"], torch.tensor(tok.special_ids))
    share = (b["text_labels"] != -100)[eligible].float().mean().item()
    assert abs(share - 0.2) < 0.05, share                  # ~1,000 eligible tokens: std ~0.013
    per_frame = b["video_mask"].flatten(2).sum(-1)          # [B, T] masked cells per frame
    assert set(per_frame[per_frame > 0].tolist()) == {12}
    cover = b["audio_mask"].float().mean().item()           # every clip 2 s: no padding
    assert abs(cover - 0.11) < 0.03, cover


def test_masks_differ_between_ranks_steps_and_examples(toy, tok):
    """The collate generator is seeded by (seed, step, rank): two ranks at one step, or one rank at two steps,
    mask the same rows differently; within a batch each example draws its own masks; and the same
    (seed, step, rank) gives the same masks (what an exact resume needs)."""
    ds = pipeline.manifest.ManifestDataset(os.path.join(toy, "video.jsonl"), CFG, tok)

    def batch(rank, step):
        return pipeline.loader._BatchMaker([ds], functools.partial(data.collate, cfg=CFG, tokenizer=tok), 4, seed=0, rank=rank)[(step, 0, [0, 1, 2, 3], [], None)]["batch"]
    a, other_rank, next_step = batch(0, 5), batch(1, 5), batch(0, 6)
    for k in ("video_mask", "audio_mask", "text_labels"):
        assert not torch.equal(a[k], other_rank[k]) and not torch.equal(a[k], next_step[k]), k
        assert torch.equal(a[k], batch(0, 5)[k]), k
    assert len({m.numpy().tobytes() for m in a["video_mask"]}) == 4


def test_caption_comes_first_and_the_transcript_is_cut(toy, tok, tmp_path):
    """Section 4.2.2: [CLS] caption [SEP] transcript [SEP]; a text longer than max_text_len loses the tail of
    the transcript, keeps the caption and ends with [SEP]."""
    caption, transcript = "a blue square", " ".join(["red circle moving left"] * 20)
    path = _write_manifest(tmp_path / "long.jsonl",
                           [{"video": os.path.join(toy, "video", "000000.mp4"), "caption": caption, "text": transcript}])
    ids = pipeline.manifest.ManifestDataset(path, CFG, tok)[0]["text_ids"]
    cap = tok.tokenizer.encode(caption, add_special_tokens=False).ids
    words = tok.tokenizer.encode(transcript, add_special_tokens=False).ids
    assert len(words) > CFG.max_text_len
    n = CFG.max_text_len - len(cap) - 3
    assert ids == [tok.cls_id] + cap + [tok.sep_id] + words[:n] + [tok.sep_id]


def test_pad_to_max_fixes_the_shapes_and_keeps_the_content(toy, tok):
    """DataConfig.pad_to_max (train.py --compile): text padded to max_text_len and audio to max_audio_s whatever
    the batch holds, so every batch of a source has the same shapes; the real tokens and samples are those of
    the batch-maximum padding, and the padding is masked out and never selected for a loss."""
    import dataclasses
    fixed = dataclasses.replace(CFG, pad_to_max=True)
    ds = pipeline.manifest.ManifestDataset(os.path.join(toy, "speech_text.jsonl"), CFG, tok)
    exs = [dict(ds[i], audio=ds[i]["audio"][:n]) for i, n in enumerate((5000, 12000, 20000))]
    short = dict(exs[1], text_ids=tok.encode_one("red", max_len=CFG.max_text_len))
    for batch in (exs, [exs[0], short]):
        a = data.collate(batch, CFG, tok, torch.Generator().manual_seed(0))
        b = data.collate(batch, fixed, tok, torch.Generator().manual_seed(0))
        N, L = int(round(CFG.max_audio_s * CFG.sample_rate)), CFG.max_text_len
        assert a["audio"].shape[1] < N and a["text_ids"].shape[1] < L        # the batch-maximum shapes are smaller
        assert b["audio"].shape == (len(batch), N) and b["audio_mask"].shape == (len(batch), int(data.speech_frames(N)))
        assert b["text_ids"].shape == b["text_attention"].shape == b["text_labels"].shape == (len(batch), L)
        n, l = a["audio"].shape[1], a["text_ids"].shape[1]
        assert torch.equal(b["audio"][:, :n], a["audio"]) and not b["audio"][:, n:].any()
        assert torch.equal(b["audio_attention"][:, :n], a["audio_attention"]) and not b["audio_attention"][:, n:].any()
        assert torch.equal(b["text_ids_clean"][:, :l], a["text_ids_clean"]) and not b["text_attention"][:, l:].any()
        assert (b["text_labels"][:, l:] == -100).all() and not b["audio_mask"][:, int(data.speech_frames(n)):].any()
    with pytest.raises(ValueError, match="does not fit the padded length 4"):
        tok.pad([[1, 2, 3, 4, 5]], length=4)
    too_long = dict(exs[0], audio=np.zeros(N + 1, dtype=np.float32))
    with pytest.raises(ValueError, match="more than max_audio_s"):
        data.collate([too_long], fixed, tok)


def test_downstream_labels_pass_through(toy, tok):
    ds = pipeline.manifest.ManifestDataset(os.path.join(toy, "downstream_train.jsonl"), CFG, tok)
    b = data.collate([ds[0], ds[1], ds[2]], CFG, tok)
    lab = b["labels"]
    assert lab["score"].shape == (3,) and lab["emotions"].shape == (3, 6) and lab["label"].dtype == torch.long
    assert all(len(a) == 4 for a in lab["answers"]) and lab["answer"].max() < 4
    assert ((lab["score"] > 0).long() == lab["label"]).all() and lab["score"].abs().max() <= 3


def test_manifest_with_byte_order_mark(tmp_path):
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "first", "label": 1}).encode() + b"\n")
    assert pipeline.manifest.read_manifest(str(p)) == [(1, {"text": "first", "label": 1})]


def test_malformed_labels_are_bad_rows(toy, tok, tmp_path):
    """A label the collator or eval.py cannot use is a bad row (reported by check, skipped in training),
    not a crash inside a DataLoader worker."""
    src = os.path.join(toy, "downstream_train.jsonl")
    lines = open(src).read().splitlines()
    rows = [json.loads(lines[i % len(lines)]) for i in range(8)]
    for r in rows:
        r["video"] = os.path.join(toy, r["video"])
    rows[1]["score"] = None
    rows[2]["emotions"] = rows[2]["emotions"][:3]
    rows[3]["label"] = "yes"
    rows[4]["answer"] = len(rows[4]["answers"])
    rows[5]["answers"] = "a b c"
    rows[6]["label"] = bool(rows[6]["label"])        # JSON true / false: a binary label, not a bad row
    path = _write_manifest(tmp_path / "labels.jsonl", rows)
    lines = []  # check's messages
    assert pipeline.commands.check_manifest(path, CFG, tok, log=lines.append) == (8, 5)
    for line, reason in {2: "score must be a number", 3: "emotions has 3 entries", 4: "label must be a number",
                         5: "answer must be an index", 6: "answers must be"}.items():
        assert any(m.startswith(f"{path}:{line}: {reason}") for m in lines), (line, reason, lines)
    ds = pipeline.manifest.ManifestDataset(path, CFG, tok)
    b = data.collate([ds[0], ds[6], ds[7]], CFG, tok)
    assert b["labels"]["emotions"].shape == (3, 6) and b["labels"]["label"][1] == int(rows[6]["label"])
    # a manifest that is not UTF-8 is reported, not a traceback
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    lines.clear()
    assert pipeline.commands.check_manifest(str(tmp_path / "latin1.jsonl"), CFG, tok, log=lines.append) == (0, 1)
    assert "cannot read the manifest" in lines[0]


# ----------------------------------------------------------------------------------------------------
# Bad rows: check reports them, the loader skips and counts them, too many stop training

@pytest.fixture()
def bad_manifest(toy, tmp_path):
    good = os.path.join(toy, "video", "000000.mp4")
    shutil.copy(good, tmp_path / "good.mp4")
    (tmp_path / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    (tmp_path / "empty.mp4").write_bytes(b"")
    raw = open(good, "rb").read()
    (tmp_path / "trunc.mp4").write_bytes(raw[:len(raw) // 2])
    _grey_clip(tmp_path / "noaudio.mp4", n=10)
    g = {"video": "good.mp4", "text": "a red circle"}
    rows = [g, {"video": "nothere.mp4", "text": "x"}, {"video": "corrupt.mp4", "text": "x"},
            {"video": "empty.mp4", "text": "x"}, {"video": "trunc.mp4", "text": "x"}, {"video": "good.mp4", "text": "  "},
            {"video": "good.mp4", "text": "x", "colour": "red"}, "{not json", {"video": "noaudio.mp4", "text": "x"},
            {"video": "good.mp4", "text": "y", "start": 3.0, "end": 4.0},
            {"video": "good.mp4", "text": "z", "mute": "no"}]
    rows += [g] * 9
    expected = {2: "missing file", 3: "undecodable video", 4: "empty file", 5: "undecodable video", 6: "empty text",
                7: "unknown field", 8: "invalid JSON", 9: "no audio stream", 10: "clip starts",
                11: "mute must be true or false"}
    return _write_manifest(tmp_path / "mixed.jsonl", rows), expected


def test_check_reports_each_bad_row(bad_manifest, tok):
    path, expected = bad_manifest
    lines = []
    rows, bad = pipeline.commands.check_manifest(path, CFG, tok, log=lines.append)
    assert (rows, bad) == (20, len(expected))
    for line, reason in expected.items():
        assert any(m.startswith(f"{path}:{line}: {reason}") for m in lines), (line, reason, lines)
    assert "20 rows, 10 bad" in lines[-1]
    assert pipeline.commands.main(["check", path]) == 1


def test_a_mute_that_is_not_a_boolean_decides_nothing(toy, tmp_path):
    """"mute": "false" (a string) is a bad row, and as a manifest's first row it does not mute the manifest
    (it would have dropped the audio of every row: any non-empty string is truthy); only JSON true mutes."""
    v = os.path.join(toy, "video", "000000.mp4")
    rows = [{"video": v, "text": "a", "mute": "false"}, {"video": v, "text": "b"}]
    path = _write_manifest(tmp_path / "mute.jsonl", rows)
    ds = pipeline.manifest.ManifestDataset(path, CFG)
    assert ds.modalities == ("video", "text", "audio")
    with pytest.raises(pipeline.media.BadExample, match="mute must be true or false, got 'false'"):
        ds[0]
    assert "audio" in ds[1]


def test_loader_skips_and_counts_bad_rows(bad_manifest, tok):
    path, expected = bad_manifest
    cfg = dataclasses.replace(CFG, max_bad_share=0.9)
    logs = []
    loader = data.make_loader([path], [1.0], cfg, tok, batch_size=4, seed=3, spares=0, log=logs.append)
    it = iter(loader)
    seen = [line for _ in range(5) for _, line in next(it)["index"]]  # one epoch: 5 batches of 4 rows
    assert loader.tried_counts["mixed"] == 20
    skipped = 20 - len(seen)
    assert skipped == len(expected) and sorted(seen) == [1] + list(range(12, 21))
    assert loader.bad_counts["mixed"] == skipped and not set(seen) & set(expected)
    assert sum(loader.bad_reasons["mixed"].values()) == skipped
    assert len(logs) == min(skipped, 5) and all("mixed.jsonl:" in m for m in logs)
    assert loader.bad_report().startswith(f"data: {path}: {skipped} of 20 rows tried were bad and skipped; reasons {{")
    # spares fill the batch in place of bad rows
    loader = data.make_loader([path], [1.0], cfg, tok, batch_size=4, seed=3, spares=6, log=logs.append)
    sizes = [len(next(iter(loader))["index"])]
    assert sizes == [4]
    # the default 10% share stops training with the manifest's name
    loader = data.make_loader([path], [1.0], CFG, tok, batch_size=4, seed=3, log=logs.append)
    with pytest.raises(pipeline.loader.TooManyBadExamples, match="mixed.jsonl"):
        for _ in itertools.islice(loader, 50):  # 10 of 20 rows are bad: stops within the first epoch or two
            pass


def test_loader_state_keeps_the_bad_row_accounts(bad_manifest, tok):
    """A resumed run goes on counting bad rows where the first left off (the final report sees the whole run),
    through a JSON round trip as in a checkpoint; its max_bad_share stop judges the rows tried since the resume."""
    path, expected = bad_manifest
    cfg = dataclasses.replace(CFG, max_bad_share=0.9)
    loader = data.make_loader([path], [1.0], cfg, tok, batch_size=4, seed=3, spares=0, log=lambda m: None)
    it = iter(loader)
    for _ in range(3):
        next(it)
    assert loader.bad_counts["mixed"] > 0
    again = data.make_loader([path], [1.0], cfg, tok, batch_size=4, seed=3, spares=0, log=lambda m: None)
    again.load_state_dict(json.loads(json.dumps(loader.state_dict())))
    assert again.bad_counts == loader.bad_counts and again.tried_counts == loader.tried_counts
    assert again.bad_reasons == loader.bad_reasons
    assert loader.since_start["mixed"] == (loader.bad_counts["mixed"], loader.tried_counts["mixed"])
    assert again.since_start == {"mixed": (0, 0)}


def test_a_small_all_bad_source_stops_once_every_row_is_tried(tmp_path, tok):
    """min_tried (50) is capped by the source's size: 6 rows, all bad, stop after the 6 tried (3 batches of 2),
    not after 50 (25 batches)."""
    path = _write_manifest(tmp_path / "allbad.jsonl", [{"video": "nothere.mp4", "text": "x"}] * 6)
    loader = data.make_loader([path], [1.0], CFG, tok, batch_size=2, seed=0, spares=0, log=lambda m: None)
    batches = 0
    with pytest.raises(pipeline.loader.TooManyBadExamples, match="6 of the 6 rows tried since this run started or resumed were bad"):
        for _ in itertools.islice(loader, 30):
            batches += 1
    # the stopping batch is not counted: the counters (and a checkpoint saved at the stop) are those after the
    # last batch handed out, so a run resumed on repaired rows does not start beyond the limit
    assert batches == 2 and loader.tried_counts["allbad"] == loader.bad_counts["allbad"] == 4
    assert loader.state_dict()["sampler"]["step"] == 2
    assert loader.bad_report() == (f"data: {path}: 4 of 4 rows tried were bad and skipped; "
                                   f"reasons {{'missing file': 4}}")


# ----------------------------------------------------------------------------------------------------
# Mixing: same source on every rank, disjoint shards, exact resume

def test_sampler_same_source_disjoint_and_resumes():
    sizes, weights, W, bs = [10, 7, 23], [1, 2, 1], 3, 2
    samplers = [pipeline.sampler.MixedBatchSampler(sizes, weights, bs, r, W, seed=5, spares=2, names="abc") for r in range(W)]
    plans = [[s.next_plan() for _ in range(60)] for s in samplers]
    per_source = {k: [[] for _ in range(W)] for k in range(3)}
    for step in range(60):
        srcs = {p[step][1] for p in plans}
        assert len(srcs) == 1  # every rank, same source
        rows = [set(p[step][2]) for p in plans]
        assert not (rows[0] & rows[1] or rows[0] & rows[2] or rows[1] & rows[2])
        for r in range(W):
            per_source[plans[r][step][1]][r] += plans[r][step][2]
            spares = plans[r][step][3]  # distinct rows of rank r's own share, none of them in the batch
            assert len(set(spares)) == len(spares) == min(2, sizes[plans[r][step][1]] // W - bs)
            assert all(sp not in plans[q][step][2] for q in range(W) for sp in spares)
    assert {p[1] for p in plans[0]} == {0, 1, 2}
    for k, n in enumerate(sizes):  # within every epoch, all rows of all ranks are distinct
        m = n // W // bs * bs  # rows per rank per epoch (an incomplete last batch is dropped)
        epochs = len(per_source[k][0]) // m
        assert epochs >= 2, (k, epochs)
        for e in range(epochs):
            rows = [row for r in range(W) for row in per_source[k][r][e * m:(e + 1) * m]]
            assert len(set(rows)) == len(rows) == m * W, (k, e)
        # reshuffled each epoch (seeded by the epoch): rank 0 does not walk the same rows every epoch
        assert len({tuple(per_source[k][0][e * m:(e + 1) * m]) for e in range(epochs)}) > 1, k
    # resume: a fresh sampler loaded from a JSON round trip of step 25's state continues identically
    s = pipeline.sampler.MixedBatchSampler(sizes, weights, bs, 1, W, seed=5, spares=2, names="abc")
    for _ in range(25):
        s.next_plan()
    state = json.loads(json.dumps(s.state_dict()))
    s2 = pipeline.sampler.MixedBatchSampler(sizes, weights, bs, 1, W, seed=5, spares=2, names="abc")
    s2.load_state_dict(state)
    assert [s2.next_plan() for _ in range(35)] == plans[1][25:]


def test_sampler_follows_the_weights_and_refuses_what_it_cannot_do():
    s = pipeline.sampler.MixedBatchSampler([50, 50, 50], [0.8, 0.2, 0.0], 4, seed=1)
    counts = np.bincount([s.source_at(k) for k in range(2000)], minlength=3)
    assert abs(counts[0] / 2000 - 0.8) < 0.04 and counts[2] == 0, counts    # std of a share ~0.009
    with pytest.raises(ValueError, match="source 0 has 10 rows, fewer than batch_size x world_size"):
        pipeline.sampler.MixedBatchSampler([10], [1], 4, rank=0, world_size=4)          # 2 rows per rank for batches of 4
    state = pipeline.sampler.MixedBatchSampler([40], [1], 2, rank=0, world_size=2, seed=3).state_dict()
    for kw in (dict(world_size=4, seed=3), dict(world_size=2, seed=4)):     # other shards, other permutations
        with pytest.raises(ValueError, match="cannot resume"):
            pipeline.sampler.MixedBatchSampler([40], [1], 2, rank=0, **kw).load_state_dict(state)


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_resumes_with_the_exact_next_batch(toy, tok, workers):
    ms = [os.path.join(toy, f"{n}.jsonl") for n in ("video", "image_text", "speech_text")]
    loader = data.make_loader(ms, [1, 1, 1], CFG, tok, batch_size=2, rank=0, world_size=2, seed=7, num_workers=workers)
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(loader.state_dict()))
    want = [next(it) for _ in range(2)]
    again = data.make_loader(ms, [1, 1, 1], CFG, tok, batch_size=2, rank=0, world_size=2, seed=7, num_workers=workers)
    again.load_state_dict(state)
    it2 = iter(again)
    got = [next(it2) for _ in range(2)]
    for a, b in zip(want, got):
        assert a["index"] == b["index"] and a["step"] == b["step"]
        for k, v in a.items():
            if torch.is_tensor(v):
                assert torch.equal(v, b[k]), k


def test_worker_loader_leaves_the_global_generator_alone(toy, tok):
    """Starting worker processes must not draw from torch's global generator: a resumed run restores it
    from the checkpoint and then starts its loader, an uninterrupted one started it at step 0, and every
    later draw (dropout, stochastic depth) would differ between the two."""
    ms = [os.path.join(toy, "image_text.jsonl")]
    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    next(iter(data.make_loader(ms, [1], CFG, tok, batch_size=2, seed=7, num_workers=1)))
    assert torch.equal(torch.rand(3), want)


STOP_SCRIPT = """
import os, signal, subprocess, sys
sys.path.insert(0, {root!r})
import data
import pipeline.text
stop = []
signal.signal(signal.SIGTERM, lambda s, f: stop.append(s))
tok = pipeline.text.load_tokenizer({tok!r})
it = iter(data.make_loader([{manifest!r}], [1], data.TOY_DATA, tok, batch_size=2, seed=0, num_workers=1))
next(it)
os.killpg(os.getpgid(0), signal.SIGTERM)    # what torchrun and `kill -- -PGID` do
subprocess.run(["pkill", "-TERM", "-P", str(os.getpid())], check=True)  # Slurm: every process (the worker)
batches = [next(it) for _ in range(3)]       # the trainer finishes its step and saves: the worker still serves
print("stopped by", stop, "then", len(batches), "batches")
# and exits with the loader still open: its own SIGTERM to the worker (multiprocessing's exit) must end it
"""


def test_workers_survive_the_stop_signal_of_the_job(toy, tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "stop.py"
    script.write_text(STOP_SCRIPT.format(root=root, tok=os.path.join(toy, "tokenizer.json"),
                                         manifest=os.path.join(toy, "image_text.jsonl")))
    import subprocess
    import sys
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                       start_new_session=True)  # its own process group, which it signals whole
    assert r.returncode == 0 and "stopped by [15] then 3 batches" in r.stdout, r.stderr[-2000:]


# ----------------------------------------------------------------------------------------------------
# Offline VQ targets, the toy world, the command line

def test_target_cache_round_trip(toy, tok, tmp_path):
    for f in ("video", "speech_text"):
        shutil.copytree(os.path.join(toy, f), tmp_path / f)
    path = shutil.copy(os.path.join(toy, "video.jsonl"), tmp_path / "v.jsonl")

    def quantize(batch):  # a stand-in tokenizer: ids from pixel and sample statistics
        v = batch["video"]
        ids = (v.mean(1).unfold(2, 16, 16).unfold(3, 16, 16).mean((-1, -2)) * 100).long().abs()
        a = batch["audio"].unfold(1, 400, 320)[:, :, :1].abs().mul(1000).long()
        return {"video_targets": ids, "audio_targets": a[:, :, 0]}

    written, bad = pipeline.targets.tokenize_manifest(str(path), CFG, quantize, batch_size=4, name="test")
    assert (written, bad) == (6, 0) and os.path.exists(tmp_path / "v.targets" / "00000001.safetensors")
    ds = pipeline.manifest.ManifestDataset(str(path), CFG, tok)
    b = data.collate([ds[0], ds[3]], CFG, tok)
    ref = quantize(data.collate([ds[0], ds[3]], CFG, tok))
    assert torch.equal(b["video_targets"], ref["video_targets"])
    assert torch.equal(b["audio_targets"], ref["audio_targets"])
    stale = pipeline.manifest.ManifestDataset(str(path), dataclasses.replace(CFG, frames=2), tok)
    assert stale.targets is None
    # the manifest edited after `tokenize`: lines 1 and 2 swapped hold other clips than their files were made
    # from, so they get no cached ids (the device makes them); line 3 keeps its own
    lines = open(path).read().splitlines()
    _write_manifest(path, [lines[1], lines[0]] + lines[2:])
    ds = pipeline.manifest.ManifestDataset(str(path), CFG, tok)
    assert ["video_targets" in ds[i] for i in range(3)] == [False, False, True]
    assert [ds[i].get("stale_targets", False) for i in range(3)] == [True, True, False]
    # said once per manifest, by the loader's own process (a worker's print would break the progress bar)
    logs = []
    loader = data.make_loader([ds], [1.0], CFG, tok, batch_size=3, seed=0, log=logs.append)
    list(itertools.islice(loader, 4))
    assert len(logs) == 1 and "v.jsonl:" in logs[0] and "re-run `python -m pipeline tokenize`" in logs[0], logs
    # an interrupted re-run leaves no cache the loader would read (not half old, half new)
    def fail_second(batch, calls=[]):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("pre-empted")
        return quantize(batch)
    with pytest.raises(RuntimeError, match="pre-empted"):
        pipeline.targets.tokenize_manifest(str(path), CFG, fail_second, batch_size=2, name="test")
    assert pipeline.manifest.ManifestDataset(str(path), CFG, tok).targets is None
    assert sorted(os.listdir(tmp_path / "v.targets")) == ["00000001.safetensors", "00000002.safetensors"]
    assert pipeline.targets.tokenize_manifest(str(path), CFG, quantize, batch_size=4, name="test") == (6, 0)
    assert all("video_targets" in e for e in pipeline.manifest.ManifestDataset(str(path), CFG, tok))


def _tree_hash(root):
    h = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            h[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return h


def test_toy_world_is_deterministic(toy, tmp_path):
    pipeline.toy.make_toy(str(tmp_path / "again"), seed=0, size="tiny")
    pipeline.toy.make_toy(str(tmp_path / "other"), seed=1, size="tiny")
    a, b, c = _tree_hash(toy), _tree_hash(tmp_path / "again"), _tree_hash(tmp_path / "other")
    a = {k: v for k, v in a.items() if not k.startswith("combo")}
    assert a == b and len(a) > 40
    assert sum(a[k] != c.get(k) for k in a) > 40


def test_toy_world_reads_clean_and_carries_content(toy, tok):
    for name in ("video", "image_text", "speech_text", "video_speech", "video_test",
                 "downstream_train", "downstream_validation", "downstream_test"):
        rows, bad = pipeline.commands.check_manifest(os.path.join(toy, f"{name}.jsonl"), CFG, tok, log=lambda m: None)
        assert rows > 0 and bad == 0, name
    # the spoken words are audible: the same word said by two speakers correlates more than two words
    rng = np.random.default_rng(0)
    spec = lambda w: np.abs(np.fft.rfft(pipeline.toy.toy_speech([w], 16000, rng, 0.5)[0]))[:4000]
    red1, red2, blue = spec("red"), spec("red"), spec("blue")
    cos = lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    assert cos(red1, red2) > cos(red1, blue) + 0.1
    assert tok.pad_id == 0 and tok.tokenizer.encode("red circle").tokens == ["[CLS]", "red", "circle", "[SEP]"]


def test_cli_bench_and_make_toy(toy, capsys):
    assert pipeline.commands.main(["bench", os.path.join(toy, "video.jsonl"), "-n", "4"]) == 0
    out = capsys.readouterr()
    assert "examples/s per worker" in out.out + out.err and "workers" in out.out
    # a bad first row is skipped like the others; a manifest with no good row ends with 1 and a reason
    good = json.loads(open(os.path.join(toy, "video.jsonl")).readline())
    good["video"] = os.path.join(toy, good["video"])
    bad = {"video": os.path.join(toy, "nothere.mp4"), "text": "x"}
    tok_arg = ["--tokenizer", os.path.join(toy, "tokenizer.json")]
    assert pipeline.commands.main(["bench", _write_manifest(os.path.join(toy, "bench1.jsonl"), [bad, good]), "-n", "4"] + tok_arg) == 0
    assert "2 examples (2 bad)" in capsys.readouterr().out
    assert pipeline.commands.main(["bench", _write_manifest(os.path.join(toy, "bench2.jsonl"), [bad, bad]), "-n", "2"] + tok_arg) == 1
    assert "no good row" in capsys.readouterr().err


def test_all_bad_plan_yields_an_empty_batch(tmp_path, tok):
    """A plan whose rows and spares are all bad still yields (an empty batch with its step), so every rank
    stays on the same step; train.common_batch then skips it everywhere."""
    path = _write_manifest(tmp_path / "allbad.jsonl", [{"video": "nothere.mp4", "text": "x"}] * 8)
    cfg = dataclasses.replace(CFG, max_bad_share=1.0)
    loader = data.make_loader([path], [1.0], cfg, tok, batch_size=4, seed=0, spares=1, log=lambda m: None)
    out = list(itertools.islice(loader, 3))
    assert [(b.get("empty"), b["step"], b["index"], b["source"]) for b in out] == [(True, k, [], "allbad") for k in range(3)]
    assert loader.tried_counts["allbad"] == loader.bad_counts["allbad"] == 3 * 5


def test_offline_targets_are_the_models_own(toy, tok, tmp_path):
    """`python -m pipeline tokenize --preset toy` writes exactly the ids the tiny model computes on the device
    (same tokenizers, same normalised waveform), and train.py refuses a cache made for another model."""
    import train
    from icode import ICode, preset
    shutil.copytree(os.path.join(toy, "video"), tmp_path / "video")
    path = shutil.copy(os.path.join(toy, "video.jsonl"), tmp_path / "v.jsonl")
    assert pipeline.commands.main(["tokenize", str(path), "--preset", "toy"]) == 0
    cached_ds = pipeline.manifest.ManifestDataset(str(path), CFG, tok)
    fresh_ds = pipeline.manifest.ManifestDataset(str(path), CFG, tok, use_targets=False)
    assert cached_ds.targets is not None and fresh_ds.targets is None
    cached = data.collate([cached_ds[i] for i in (0, 2, 3)], CFG, tok, torch.Generator().manual_seed(1))
    fresh = data.collate([fresh_ds[i] for i in (0, 2, 3)], CFG, tok, torch.Generator().manual_seed(1))
    assert "audio_targets" in cached and "audio_targets" not in fresh
    model = ICode(preset("tiny"))
    t_cached, t_fresh = model.targets(cached), model.targets(fresh)
    for k in ("video", "audio"):
        assert (t_fresh[k] != -100).any() and torch.equal(t_cached[k], t_fresh[k]), k
    train.check_target_caches([cached_ds, fresh_ds], model)
    for other in (dataclasses.replace(model.cfg, tokenizer_seed=1),    # same codebook sizes, other codes
                  dataclasses.replace(model.cfg, video_codebook=16)):
        with pytest.raises(ValueError, match=r"v\.targets: the target cache was written by tokenizers [0-9a-f]{16} "
                                             r"\(target tokenizers of the tiny model .*the model's are [0-9a-f]{16}"):
            train.check_target_caches([cached_ds], ICode(other))
    with open(tmp_path / "v.targets" / "meta.json") as f:   # a cache written by a callable without a fingerprint
        meta = json.load(f)
    cached_ds.targets_meta = dict(meta, tokenizers=None)
    with pytest.raises(ValueError, match="written by tokenizers None"):
        train.check_target_caches([cached_ds], model)
