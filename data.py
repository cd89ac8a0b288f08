"""Data for i-Code pretraining: masking (paper section 4.2.1, appendix A.1), media decoding, batches.

This part: the three masking strategies, written so that each can be read next to the paper.

    mask_tokens   MLM: 30% of text tokens, BERT's 80/10/10 rule (section 4.2.1, footnote 2)
    tube_mask     MVM: a 2D mask of 50% of the token grid repeated over a run of frames (appendix A.1,
                  after Wang et al. 2021, BEVT)
    span_mask     MSM: HuBERT / wav2vec 2.0 span masking, p = 8%, span l = 10 (section 4.2.1)

Every function takes an optional `torch.Generator`, so a collator seeded per step is reproducible.

Below the masking (section "Media files to batches"): JSON Lines manifests, decoding through PyAV and
soundfile, the collator, the multi-source sampler, the offline VQ-target cache, the toy world and the
`python data.py make-toy|check|bench|tokenize` commands.
"""
import argparse
import collections
import dataclasses
import fractions
import functools
import hashlib
import itertools
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we fork DataLoader workers after using the tokenizer

import av
import numpy as np
import soundfile
import tokenizers
import torch

from losses import IGNORE_INDEX as PAD_LABEL  # ignore index of the masked-unit losses
from model.fusion import MODALITIES
from model.quantizers import IMAGENET_MEAN, IMAGENET_STD
from model.wavlm import SPEECH_KERNELS, SPEECH_STRIDES, conv_output_length


# ----------------------------------------------------------------------------------------------------
# Masked language modelling (section 4.2.1, footnote 2)

def mask_tokens(ids, special_mask, mask_id, vocab_size, ratio=0.3, generator=None):
    """BERT-style masking of a batch of token ids, with a per-row count as fairseq draws it.

    ids:          [B, L] long, token ids (padding included)
    special_mask: [B, L] bool, True where the token may not be selected ([CLS], [SEP], padding)
    Each row selects n = int(ratio * e + U[0, 1)) of its e eligible tokens (fairseq's MaskTokensDataset:
    ratio * e in expectation, 30% in the paper), uniformly without replacement; of the selected tokens 80%
    become `mask_id`, 10% a uniformly random id in [0, vocab_size), 10% stay. The count has a bound known
    from the shape alone (`mask_tokens_max`), which a sync-free selection of the masked positions needs
    (`masked_rows`); BERT's independent draw per token has none below L.
    Returns (inputs [B, L] long, labels [B, L] long): labels hold the original id at selected positions
    and -100 elsewhere (the ignore index of `losses.masked_unit_loss`).
    """
    if ids.shape != special_mask.shape or ids.dim() != 2:
        raise ValueError(f"ids {tuple(ids.shape)} and special_mask {tuple(special_mask.shape)} must be the same [B, L]")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    g = generator
    eligible = ~special_mask.bool()
    u = torch.rand(ids.shape, generator=g, device=ids.device)              # [B, L] priorities: a uniform subset
    e = eligible.sum(1)                                                    # [B]
    n = (ratio * e.double() + torch.rand(e.shape, generator=g, dtype=torch.float64, device=ids.device)).floor()
    n = torch.minimum(n.long(), e)                                         # [B] tokens to select per row
    rank = u.masked_fill(~eligible, 2.0).argsort(1).argsort(1)             # [B, L] eligible ones rank first
    selected = rank < n[:, None]
    labels = torch.where(selected, ids, torch.full_like(ids, -100))
    # One more uniform draw per position decides the replacement: [0, .8) mask, [.8, .9) random, [.9, 1) keep.
    r = torch.rand(ids.shape, generator=g, device=ids.device)
    random_ids = torch.randint(0, vocab_size, ids.shape, generator=g, device=ids.device)
    inputs = torch.where(selected & (r < 0.8), torch.full_like(ids, mask_id), ids)
    inputs = torch.where(selected & (r >= 0.8) & (r < 0.9), random_ids, inputs)
    return inputs, labels


def mask_tokens_max(length, ratio=0.3):
    """The most tokens `mask_tokens` selects in a row of `length`: int(ratio * e + U) <= floor(ratio * L) + 1
    for e <= L eligible tokens (the + 1 also covers the rounding of ratio * e + U up to an integer)."""
    return min(length, math.floor(ratio * length) + 1)


# ----------------------------------------------------------------------------------------------------
# Masked vision modelling: tube masking (appendix A.1)

def tube_mask(frames, height, width, ratio=0.5, generator=None, static=False):
    """3D tube mask on the visual-token grid (appendix A.1; Wang et al. 2021).

    The grid is the MVM prediction grid: `frames` = T, `height` = H/16, `width` = W/16 (one PeCo token
    per 16x16 patch of each frame, eq. (4)). Draws
      - one 2D mask with exactly round(ratio * height * width) positions (50% in the paper),
      - a tube length l uniform in [ceil(frames/2), frames],
      - a start frame t uniform in [0, frames - l],
    and masks the 2D positions in frames t .. t+l-1 and nowhere else (no wrap-around).
    static=True (an image as a clip of identical frames, `read_image`): the tube spans every frame (l = T,
    t = 0). A frame left unmasked would show the very content, and hence the very target ids, of the masked
    cells of the others; the paper's tube is written for videos and says nothing of images (README,
    "Differences from the paper").
    Returns mask: [frames, height, width] bool, True is masked.

    How the other grids see it (`tube_to_patch_mask`): the Video Swin patch grid is T/2 x H/4 x W/4
    (2x4x4 patches, appendix A.1), so one token cell covers 4x4 patches spatially, and one temporal patch
    covers frames 2k and 2k+1. A patch is masked if any frame it covers is masked (so the encoder never
    sees pixels of a masked token); the MVM loss is computed on the token grid itself.
    """
    if frames < 1 or height < 1 or width < 1:
        raise ValueError(f"grid must be non-empty, got frames={frames}, height={height}, width={width}")
    g = generator
    n = height * width
    k = int(round(ratio * n))
    flat = torch.zeros(n, dtype=torch.bool)
    flat[torch.randperm(n, generator=g)[:k]] = True
    if static:
        length, start = frames, 0
    else:
        lo = math.ceil(frames / 2)
        length = int(torch.randint(lo, frames + 1, (1,), generator=g))
        start = int(torch.randint(0, frames - length + 1, (1,), generator=g))
    mask = torch.zeros(frames, height, width, dtype=torch.bool)
    mask[start:start + length] = flat.view(height, width)
    return mask


def tube_mask_max(frames, height, width, ratio=0.5):
    """The most cells `tube_mask` masks: round(ratio * height * width) in each of at most `frames` frames."""
    return frames * int(round(ratio * height * width))


def tube_to_patch_mask(mask, temporal_patch=2, spatial_ratio=4):
    """Map a token-grid mask [..., T, H/16, W/16] to the Video Swin patch grid [..., T/2, H/4, W/4].

    Spatially each token cell becomes a `spatial_ratio` x `spatial_ratio` block of 4x4-pixel patches
    (16 / 4 = 4); temporally a patch covering frames (2k, 2k+1) is masked if either frame is masked.
    """
    *lead, t, h, w = mask.shape
    if t % temporal_patch:
        raise ValueError(f"frames ({t}) must be divisible by the temporal patch size ({temporal_patch})")
    m = mask.reshape(*lead, t // temporal_patch, temporal_patch, h, w).any(dim=-3)
    return m.repeat_interleave(spatial_ratio, dim=-2).repeat_interleave(spatial_ratio, dim=-1)


# ----------------------------------------------------------------------------------------------------
# Masked span modelling (section 4.2.1; HuBERT / wav2vec 2.0)

def span_mask(length, p=0.08, span=10, generator=None):
    """HuBERT / wav2vec 2.0 span masking of one sequence of `length` frames.

    Semantics (as implemented, with the paper's p = 8%, l = 10): int(p * length + U[0, 1)) start
    indices, at least one, are drawn without replacement from [0, length); each masks `span`
    consecutive frames, clipped at the end. Spans may overlap, so the masked share is below p * span;
    for long sequences its expectation is close to 1 - (1 - p)^span (about 57% for the defaults).
    fairseq's `compute_mask_indices` draws int(mask_prob * length / span + U[0, 1)) starts, so its
    mask_prob is p * span (HuBERT's 0.8 is p = 8% with l = 10), and draws them only from [0, length - span];
    we draw from the whole sequence and clip, which keeps the coverage of the last frames equal to the others'.
    Returns mask: [length] bool, True is masked.
    """
    if length < 1:
        raise ValueError(f"length must be positive, got {length}")
    g = generator
    n_starts = int(p * length + float(torch.rand((), generator=g)))
    n_starts = min(max(n_starts, 1), length)
    starts = torch.randperm(length, generator=g)[:n_starts]
    mask = torch.zeros(length, dtype=torch.bool)
    for s in starts.tolist():
        mask[s:s + span] = True
    return mask


def span_mask_max(length, p=0.08, span=10):
    """The most frames `span_mask` masks in a sequence of at most `length` frames: int(p * n + U) <=
    floor(p * length) + 1 starts (at least one), `span` frames each, at most all of them."""
    return min(length, max(1, math.floor(p * length) + 1) * span)


def _example_bounds(cfg, batch):
    """{modality: (the batch key of its mask or labels, the most positions one example can have masked)}, from
    the shapes and `cfg`'s masking settings alone."""
    m, out = batch["modalities"], {}
    if "text" in m:
        out["text"] = ("text_labels", mask_tokens_max(batch["text_labels"].shape[1], cfg.text_mask_ratio))
    if "video" in m:
        _, T, h, w = batch["video_mask"].shape
        out["video"] = ("video_mask", tube_mask_max(T, h, w, cfg.tube_ratio))
    if "audio" in m:
        out["audio"] = ("audio_mask", span_mask_max(batch["audio_mask"].shape[1], cfg.span_p, cfg.span_len))
    return out


def masked_rows(cfg, batch):
    """Static bounds on a collated batch's masked positions, from its shapes and the masking settings of
    `cfg` (a DataConfig) alone: {"text": B * mask_tokens_max, "video": B * tube_mask_max, "audio":
    B * span_mask_max} for the modalities present. The heads select that many rows instead of as many as
    are masked (model/heads.py `_select`): no device sync, static shapes, so CUDA graphs can capture the
    step. It holds for masks drawn by this file's masking functions with `cfg`'s settings, as `collate` and
    train.py's synthetic batch draw them; `check_masked_rows` checks a batch on the host."""
    return {k: batch[key].shape[0] * bound for k, (key, bound) in _example_bounds(cfg, batch).items()}


def check_masked_rows(cfg, batch):
    """ValueError if an example of a (host) batch has more masked positions than `masked_rows` allows for it:
    the heads' static selection would otherwise rely on a device-side assertion alone."""
    for k, (key, bound) in _example_bounds(cfg, batch).items():
        t = batch[key]
        n = (t != PAD_LABEL if key == "text_labels" else t).flatten(1).sum(1)        # [B] masked per example
        if (n > bound).any():
            i = int(n.argmax())
            raise ValueError(f"example {i} of a batch from source {batch.get('source')!r} has {int(n[i])} masked "
                             f"{k} positions, more than the {bound} its shape allows under the masking settings "
                             f"(text_mask_ratio={cfg.text_mask_ratio}, tube_ratio={cfg.tube_ratio}, "
                             f"span_p={cfg.span_p}, span_len={cfg.span_len}): the heads' static selection "
                             f"(--compile-mode reduce-overhead, data.masked_rows) would not hold them")


def span_mask_batch(lengths, max_length=None, p=0.08, span=10, generator=None):
    """Batched `span_mask` that respects each row's true length.

    lengths: [B] true frame counts. Returns mask: [B, max_length] bool, True is masked, never True at
    or beyond a row's length (padding is never masked).
    """
    lengths = [int(x) for x in lengths]
    max_length = max(lengths) if max_length is None else max_length
    out = torch.zeros(len(lengths), max_length, dtype=torch.bool)
    for i, n in enumerate(lengths):
        if n > max_length:
            raise ValueError(f"row {i} has length {n} > max_length {max_length}")
        if n > 0:
            out[i, :n] = span_mask(n, p, span, generator)
    return out


# ====================================================================================================
# Media files to batches (paper section 3: three-modality video clips and dual-modality pairs)
#
# Manifest format (JSON Lines, one example per line, paths relative to the manifest's folder):
#   video    a container (MP4, MKV, WebM...) read through PyAV; its audio stream is the speech input
#            unless the row has its own `audio` or sets "mute": true
#   start, end  seconds into `video` (and `audio`) cutting a clip out of a long file (optional)
#   image    a still image (JPEG, PNG...), read through PyAV as a static clip of `frames` frames
#   audio    a separate audio file: WAV/FLAC through soundfile, anything else through PyAV
#   text     transcript or caption; caption  an extra caption (videos: section 4.2.2 joins both)
#   mute     true: ignore the video's audio stream (video-caption pairs without speech)
#   id       free-form identifier, ignored
#   score, emotions, label, question, answers, answer   downstream labels, passed through
# The first valid row decides the manifest's modalities; every row must provide them.

MEDIA_FIELDS = ("video", "image", "audio", "text", "caption", "start", "end", "mute", "id")
LABEL_FIELDS = ("score", "emotions", "label", "question", "answers", "answer")
KNOWN_FIELDS = frozenset(MEDIA_FIELDS + LABEL_FIELDS)
SOUNDFILE_EXTS = (".wav", ".flac")


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_labels(row, emotions_len=None):
    """Raise BadExample unless the row's downstream labels have the types the collator and eval.py need:
    score a number, emotions a list of numbers (`emotions_len` long: the first row's), label a number or a
    boolean, question a string, answers a non-empty list of strings, answer an index into answers."""
    if "score" in row and not _is_number(row["score"]):
        raise BadExample(f"score must be a number, got {row['score']!r}")
    if "label" in row and not (_is_number(row["label"]) or isinstance(row["label"], bool)):
        raise BadExample(f"label must be a number or a boolean, got {row['label']!r}")
    if "emotions" in row:
        e = row["emotions"]
        if not isinstance(e, list) or not e or not all(_is_number(x) for x in e):
            raise BadExample(f"emotions must be a non-empty list of numbers, got {e!r}")
        if emotions_len is not None and len(e) != emotions_len:
            raise BadExample(f"emotions has {len(e)} entries, the manifest's first row {emotions_len}")
    if "question" in row and not isinstance(row["question"], str):
        raise BadExample(f"question must be a string, got {row['question']!r}")
    answers = row.get("answers")
    n = len(answers) if isinstance(answers, list) else None
    if "answers" in row and (not n or not all(isinstance(a, str) for a in answers)):
        raise BadExample(f"answers must be a non-empty list of strings, got {answers!r}")
    if "answer" in row:
        a = row["answer"]
        if not isinstance(a, int) or isinstance(a, bool) or a < 0 or (n is not None and a >= n):
            raise BadExample(f"answer must be an index into answers ({n if n is not None else 'none'} given), got {a!r}")
DECODE_THREADS = 1                   # codec threads per worker: scale with DataLoader workers instead


@dataclass
class DataConfig:
    frames: int = 8                  # T: frames evenly spaced over a clip (section 3: "we evenly sample 8 video frames")
    image_size: int = 224            # H = W: shorter side resized to this, then centre-cropped (CoSwin input)
    token_patch: int = 16            # pixels per MVM token cell (one PeCo token per 16x16 patch): grid H/16 x W/16
    max_audio_s: float = 8.0         # waveform cut to this many seconds from the clip start (clips average 7.8 s, section 3)
    sample_rate: int = 16000         # Hz, WavLM's input rate; every audio source is resampled to it, mono
    max_text_len: int = 128          # T_l cap, [CLS] and [SEP] included; longer texts lose their tail
    text_mask_ratio: float = 0.3     # MLM: 30% of the text tokens (section 4.2.1)
    tube_ratio: float = 0.5          # MVM: 50% of each frame's token grid (section 4.2.1, appendix A.1)
    span_p: float = 0.08             # MSM: share of frames that start a span (p = 8, section 4.2.1)
    span_len: int = 10               # MSM: span length l = 10 frames (section 4.2.1)
    mean: tuple = IMAGENET_MEAN      # per-channel normalisation expected by the ImageNet-pretrained vision encoder
    std: tuple = IMAGENET_STD
    max_bad_share: float = 0.1       # stop training when more than this share of a source's tried rows is bad
    min_audio_samples: int = 400     # one speech frame (the conv encoder's receptive field); shorter audio is bad
    pad_to_max: bool = False         # pad text to max_text_len and audio to max_audio_s instead of to the batch's
                                     # longest: fixed shapes, so torch.compile builds one graph per modality set


PAPER_DATA = DataConfig()            # section 3: 8 frames at 224 px, ~7.8 s clips at 16 kHz
TOY_DATA = DataConfig(frames=4, image_size=64, max_audio_s=2.0, max_text_len=32)  # the toy world (make_toy)


def speech_frames(n):
    """T_s for a waveform of n samples (int or LongTensor): the conv feature encoder's output length."""
    return conv_output_length(n, SPEECH_KERNELS, SPEECH_STRIDES)


class BadExample(Exception):
    """A row that cannot become an example; `reason` says why in words (the loader skips and counts it)."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


def reason_kind(reason):
    """The short kind of a BadExample reason ("missing file", "undecodable video", ...) for summaries."""
    return reason.split(":")[0].split("(")[0].strip()


class TooManyBadExamples(RuntimeError):
    """More than `DataConfig.max_bad_share` of a source's rows were bad: fix the data, don't train on it."""


# ----------------------------------------------------------------------------------------------------
# Video and images through PyAV

def _open(path, what):
    if not os.path.exists(path):
        raise BadExample(f"missing file: {path}")
    if os.path.getsize(path) == 0:
        raise BadExample(f"empty file: {path}")
    try:
        return av.open(path)
    except (av.FFmpegError, OSError, ValueError) as e:
        raise BadExample(f"undecodable {what} (cannot open {path}: {e})") from e


def _rotation(frame, stream, path):
    """Counter-clockwise display rotation in degrees: display-matrix side data, else the old `rotate` tag."""
    r = frame.rotation
    # FFmpeg looks tags up ignoring case (av_dict_get); Matroska stores this one as ROTATE
    tag = next((v for k, v in stream.metadata.items() if k.lower() == "rotate"), None)
    if not r and tag:
        try:
            r = -float(tag)  # the tag is clockwise
        except ValueError:
            raise BadExample(f"unreadable rotate tag: {tag!r} in {path}") from None
    return int(round(r / 90.0)) * 90 % 360


def frame_to_rgb(frame, size, rotation=0):
    """One decoded frame -> uint8 [size, size, 3]: rotate for display, shorter side to `size`, centre crop."""
    w, h = frame.width, frame.height
    disp_w, disp_h = (h, w) if rotation % 180 else (w, h)
    s = size / min(disp_w, disp_h)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    nw, nh = max(nw, size), max(nh, size)  # both sides must cover the crop, whichever way it is turned
    img = frame.to_ndarray(width=nw, height=nh, format="rgb24", interpolation="BILINEAR")
    if rotation:
        img = np.rot90(img, k=rotation // 90)  # np.rot90 turns counter-clockwise, like the display matrix
    y0, x0 = (img.shape[0] - size) // 2, (img.shape[1] - size) // 2
    return np.ascontiguousarray(img[y0:y0 + size, x0:x0 + size])


def _frame_time(frame, tb):
    return float(frame.pts * tb) if frame.pts is not None else float(frame.time or 0.0)


def _decode_from(container, stream, t):
    """Frames of `stream` from the keyframe at or before time t (seconds, stream clock).

    MP4, MKV and WebM seek exactly; MPEG-TS and FLV may land after t (their seek goes by byte position), and
    the frame on display at t would be lost. So when the first frame decoded is later than t, seek again 1,
    2, 4, ... s earlier, down to the start of the stream.
    """
    tb, back = stream.time_base, 0.0
    while True:
        container.seek(max(0, int((t - back) / tb)), stream=stream, backward=True, any_frame=False)
        gen = container.decode(stream)
        first = next(gen, None)
        if first is None:
            if t - back <= 0:
                return iter(())
        elif _frame_time(first, tb) <= t + 1e-6 or t - back <= 0:
            return itertools.chain([first], gen)
        back = max(1.0, 2 * back)


def frames_at(container, stream, targets, seek=True):
    """The frame on display at each target time (seconds, stream clock): the last one with pts <= t.

    With seek=True we jump to the keyframe before a target whenever the stream's index has a keyframe
    between the last decoded frame and the target (or, without an index, when the gap exceeds 2 s), so a
    clip out of a long file decodes only a few GOPs; seek=False decodes everything from the start (the
    reference the tests compare with). A target before the first frame gets the first frame; one after
    the last frame gets the last. Returns a list of av.VideoFrame (repeated where targets share a frame).
    """
    tb = stream.time_base
    keyframes = sorted(float(e.timestamp * tb) for e in stream.index_entries if e.is_keyframe) if seek else []
    out = [None] * len(targets)
    gen, prev, nxt, done = None, None, None, False
    for i in sorted(range(len(targets)), key=targets.__getitem__):
        t = targets[i]
        ref = nxt if nxt is not None else prev
        last = _frame_time(ref, tb) if ref is not None else -math.inf
        jump = any(last < k <= t for k in keyframes) if keyframes else t - last > 2.0
        if gen is None or (seek and jump):
            gen = _decode_from(container, stream, t) if seek else container.decode(stream)
            prev, nxt, done = None, None, False
        if nxt is not None and _frame_time(nxt, tb) <= t:
            prev, nxt = nxt, None
        while nxt is None and not done:
            try:
                f = next(gen)
            except StopIteration:
                done = True
                break
            if _frame_time(f, tb) <= t + 1e-6:
                prev = f
            else:
                nxt = f
        out[i] = prev if prev is not None else nxt
        if out[i] is None:
            raise BadExample("no decodable video frames")
    return out


def read_video(path, frames, size, start=None, end=None, seek=True):
    """`frames` frames evenly spaced over [start, end] of a video -> uint8 [T, size, size, 3].

    The targets are the centres of T equal segments of the clip (start and end default to the stream's
    start and duration). Clips with fewer than T frames repeat frames; rotated phone videos are turned
    upright; odd resolutions are scaled (shorter side to `size`) and centre-cropped.
    """
    container = _open(path, "video")
    with container:
        if not container.streams.video:
            raise BadExample(f"no video stream in {path}")
        vs = container.streams.video[0]
        vs.thread_count = DECODE_THREADS
        tb = vs.time_base
        t0 = float(vs.start_time * tb) if vs.start_time is not None else 0.0
        if vs.duration:
            duration = float(vs.duration * tb)
        elif container.duration:
            duration = container.duration / 1e6
        else:
            duration = None
        a = float(start or 0.0)
        b = float(end) if end is not None else duration
        if b is None:  # unknown length (some streams): decode everything once to learn it
            times = [_frame_time(f, tb) for f in container.decode(vs)]
            if not times:
                raise BadExample(f"no decodable video frames in {path}")
            b = times[-1] - t0 + (times[-1] - times[-2] if len(times) > 1 else 0.04)
            container.seek(0, stream=vs)
        if duration is not None:
            if a >= duration:
                raise BadExample(f"clip starts at {a:.3f}s but the video lasts {duration:.3f}s")
            b = min(b, duration)
        if b <= a:
            raise BadExample(f"empty clip: start {a} >= end {b}")
        targets = [t0 + a + (i + 0.5) * (b - a) / frames for i in range(frames)]
        try:
            picked = frames_at(container, vs, targets, seek=seek)
            rotation = _rotation(picked[0], vs, path)
            cache = {}
            out = [cache.setdefault(id(f), frame_to_rgb(f, size, rotation)) for f in picked]
        except av.FFmpegError as e:
            raise BadExample(f"undecodable video {path}: {e}") from e
        return np.stack(out)


# EXIF Orientation -> the stored pixels turned for display (the tag says where the stored row 0 / column 0
# belong: 2 mirrored, 3 upside down, 4 flipped vertically, 5 transposed, 6 turned left, 7 transversed, 8 turned right)
EXIF_ORIENT = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
               5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1),
               7: lambda a: a[::-1, ::-1].transpose(1, 0, 2), 8: lambda a: np.rot90(a, 1)}


def jpeg_orientation(path):
    """The EXIF Orientation tag (1-8) of a JPEG file; None without one (or for another format).

    FFmpeg hands the tag on as the frame's display matrix, but PyAV gives only its angle, which for the
    mirrored orientations (2, 4, 5, 7) is not the right transform; so images read the tag themselves."""
    with open(path, "rb") as f:
        if f.read(2) != b"\xff\xd8":
            return None
        while True:  # marker segments up to the image data
            head = f.read(4)
            if len(head) < 4 or head[0] != 0xFF or head[1] in (0xD9, 0xDA):
                return None
            seg = f.read(int.from_bytes(head[2:], "big") - 2)
            if head[1] == 0xE1 and seg[:6] == b"Exif\x00\x00":
                t = seg[6:]  # a TIFF header: byte order, 42, offset of IFD0; IFD0: count, 12-byte entries
                order = {b"II": "little", b"MM": "big"}.get(t[:2])
                if order is None:
                    return None
                ifd = int.from_bytes(t[4:8], order)
                for k in range(int.from_bytes(t[ifd:ifd + 2], order)):
                    e = t[ifd + 2 + 12 * k: ifd + 14 + 12 * k]
                    if int.from_bytes(e[:2], order) == 0x0112:
                        v = int.from_bytes(e[8:10], order)
                        return v if v in EXIF_ORIENT else None
                return None


def read_image(path, frames, size):
    """A still image -> uint8 [T, size, size, 3], the same frame T times.

    Images become static clips of the same `frames` count as videos, so the vision encoder (a video Swin,
    section 4.1: "images and sequence of frames") and the MVM token grid see one shape for every source.
    """
    container = _open(path, "image")
    with container:
        if not container.streams.video:
            raise BadExample(f"no image stream in {path}")
        try:
            frame = next(container.decode(video=0), None)
        except av.FFmpegError as e:
            raise BadExample(f"undecodable image {path}: {e}") from e
        if frame is None:
            raise BadExample(f"undecodable image {path}: no frame")
        orientation = jpeg_orientation(path)
        if orientation is None:
            img = frame_to_rgb(frame, size, _rotation(frame, container.streams.video[0], path))
        else:  # the square crop turns like the whole image (both sides scale by the same factor)
            img = np.ascontiguousarray(EXIF_ORIENT[orientation](frame_to_rgb(frame, size)))
    return np.repeat(img[None], frames, axis=0)


# ----------------------------------------------------------------------------------------------------
# Audio: soundfile for WAV/FLAC, PyAV for the rest (video containers included); 16 kHz mono

def resample(x, from_sr, to_sr):
    """float32 [N] mono at from_sr -> float32 [N * to_sr / from_sr] through libswresample (keeps the duration)."""
    if from_sr == to_sr:
        return np.asarray(x, dtype=np.float32)
    rs = av.AudioResampler(format="flt", layout="mono", rate=to_sr)
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x, dtype=np.float32)[None], format="flt", layout="mono")
    frame.sample_rate = from_sr
    frame.pts = 0
    chunks = [o.to_ndarray()[0] for o in rs.resample(frame)] + [o.to_ndarray()[0] for o in rs.resample(None)]
    return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)


def _read_audio_av(path, sr, start, end, max_s=None, video_clock=False):
    """[start, end] of a file's first audio stream at `sr` mono (through PyAV); decoding stops once
    `end` or start + max_s is reached (a clip out of a long file decodes only that far).

    Times count from the audio stream's start, or with video_clock=True (the sound track of a row's video)
    from the video stream's start, the origin `read_video` uses: streams of one container can start at
    different times (MPEG-TS and FLV written by FFmpeg start the video 64 ms after the audio; broadcast
    recordings by more), and one origin keeps picture and sound in sync. Sound that starts after the origin is
    preceded by silence.
    """
    container = _open(path, "audio")
    with container:
        if not container.streams.audio:
            raise BadExample(f"no audio stream in {path}")
        st = container.streams.audio[0]
        tb = st.time_base
        clock = container.streams.video[0] if video_clock and container.streams.video else st
        t0 = float(clock.start_time * clock.time_base) if clock.start_time is not None else 0.0
        rs = av.AudioResampler(format="flt", layout="mono", rate=sr)
        if start > 0:
            container.seek(max(0, int((t0 + start) / tb)), stream=st, backward=True)
        chunks, first, n = [], None, 0
        stop = t0 + min(end if end is not None else math.inf, start + (max_s if max_s is not None else math.inf))
        try:
            for frame in container.decode(st):
                if first is None:
                    first = _frame_time(frame, tb)
                frame.pts = None  # let the resampler count samples (robust to timestamp gaps)
                new = [o.to_ndarray()[0] for o in rs.resample(frame)]
                chunks += new
                n += sum(len(c) for c in new)
                if first + n / sr >= stop:
                    break
            chunks += [o.to_ndarray()[0] for o in rs.resample(None)]
        except av.FFmpegError as e:
            raise BadExample(f"undecodable audio {path}: {e}") from e
        if not chunks:
            raise BadExample(f"no decodable audio in {path}")
        x = np.concatenate(chunks)
        skip = int(round((t0 + start - first) * sr))
        if skip < 0:  # the first sound comes after the clip's start: silence until then
            return np.concatenate([np.zeros(-skip, np.float32), x])
        return x[skip:]


def samples_in(seconds, sr):
    """Samples in `seconds` at `sr` Hz as read_audio cuts them (and collate's pad_to_max pads to)."""
    return int(round(seconds * sr))


def read_audio(path, sr=16000, start=None, end=None, max_s=None, min_samples=1, video_clock=False):
    """Audio of [start, end] seconds -> float32 [N] mono at `sr`, at most max_s seconds from the start.
    video_clock: the file is a video whose own sound track this is; times count from its video stream's
    start, as the frames' do (`_read_audio_av`)."""
    a = float(start or 0.0)
    if path.lower().endswith(SOUNDFILE_EXTS):
        if not os.path.exists(path):
            raise BadExample(f"missing file: {path}")
        try:
            info = soundfile.info(path)
            i0 = int(round(a * info.samplerate))
            i1 = info.frames if end is None else min(info.frames, int(round(float(end) * info.samplerate)))
            if max_s is not None:
                i1 = min(i1, i0 + int(math.ceil(max_s * info.samplerate)))
            if i0 >= info.frames:
                raise BadExample(f"clip starts at {a:.3f}s but the audio lasts {info.frames / info.samplerate:.3f}s")
            x, _ = soundfile.read(path, start=i0, stop=i1, dtype="float32", always_2d=True)
        except (RuntimeError, soundfile.SoundFileError) as e:  # LibsndfileError is a RuntimeError
            raise BadExample(f"undecodable audio {path}: {e}") from e
        x = resample(x.mean(axis=1), info.samplerate, sr)
    else:
        x = _read_audio_av(path, sr, a, end, max_s, video_clock)
    limit = math.inf if end is None else float(end) - a
    if max_s is not None:
        limit = min(limit, max_s)
    if limit < math.inf:
        x = x[:samples_in(limit, sr)]
    if len(x) < min_samples:
        raise BadExample(f"audio shorter than one speech frame: {len(x)} samples at {sr} Hz (< {min_samples}) in {path}")
    return np.ascontiguousarray(x, dtype=np.float32)


# ----------------------------------------------------------------------------------------------------
# Text through a `tokenizers` tokenizer.json

class TextTokenizer:
    """A `tokenizers.Tokenizer` plus the ids the collator needs.

    .tokenizer    the tokenizers.Tokenizer (its post-processor adds [CLS] ... [SEP])
    .vocab_size, .pad_id, .mask_id, .cls_id, .sep_id, .unk_id, .special_ids (a sorted tuple)
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()

        def find(*names):
            for n in names:
                i = tokenizer.token_to_id(n)
                if i is not None:
                    return i
            return None
        self.pad_id = find("[PAD]", "<pad>")
        self.mask_id = find("[MASK]", "<mask>")
        self.cls_id = find("[CLS]", "<s>", "<cls>")
        self.sep_id = find("[SEP]", "</s>", "<sep>")
        self.unk_id = find("[UNK]", "<unk>")
        if self.pad_id is None or self.mask_id is None:
            raise ValueError(f"tokenizer needs a pad and a mask token, got pad={self.pad_id} mask={self.mask_id}")
        self.special_ids = tuple(sorted({i for i in (self.pad_id, self.mask_id, self.cls_id, self.sep_id) if i is not None}))

    def encode_one(self, text, pair=None, max_len=128):
        """One text (and an optional second segment) -> list of ids, truncated to max_len keeping the final [SEP]."""
        ids = self.tokenizer.encode(text, pair).ids
        if len(ids) > max_len:
            ids = ids[:max_len - 1] + [ids[-1]] if ids[-1] == self.sep_id else ids[:max_len]
        return ids

    def pad(self, seqs, length=None):
        """lists of ids -> (ids [B, L] long padded with pad_id, attention [B, L] bool, True = real token).
        L is the longest sequence's length, or `length` when given (no sequence may be longer)."""
        longest = max(len(s) for s in seqs)
        if length is not None and longest > length:
            raise ValueError(f"a sequence of {longest} ids does not fit the padded length {length}")
        L = max(1, longest) if length is None else length
        ids = torch.full((len(seqs), L), self.pad_id, dtype=torch.long)
        att = torch.zeros(len(seqs), L, dtype=torch.bool)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
            att[i, :len(s)] = True
        return ids, att

    def encode(self, texts, max_len=128):
        """list of str (or (first, second) pairs) -> (ids [B, L] long, attention [B, L] bool)."""
        return self.pad([self.encode_one(*t, max_len=max_len) if isinstance(t, tuple) else
                         self.encode_one(t, max_len=max_len) for t in texts])


def load_tokenizer(path):
    """tokenizer.json -> TextTokenizer (the raw `tokenizers.Tokenizer` is its `.tokenizer`)."""
    return TextTokenizer(tokenizers.Tokenizer.from_file(str(path)))


def train_tokenizer(texts, path, vocab_size=400):
    """Build a lower-cased WordPiece tokenizer.json from `texts`: [PAD]=0, [UNK], [CLS], [SEP], [MASK], every
    character (alone and as a "##" continuation, so no word is ever unknown), then the most frequent whole
    words. Counting words ourselves instead of running a `tokenizers` trainer keeps the file bit-identical
    from run to run (the trainers break ties between equal counts in no fixed order)."""
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    norm, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    counts = collections.Counter(w for t in texts for w, _ in pre.pre_tokenize_str(norm.normalize_str(t)))
    chars = sorted({c for w in counts for c in w})
    vocab = specials + chars + ["##" + c for c in chars]
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if w not in vocab]
    vocab += words[:max(0, vocab_size - len(vocab))]
    tok = tokenizers.Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = norm, pre, decoders.WordPiece()
    cls, sep = vocab.index("[CLS]"), vocab.index("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tok.save(str(path))
    return TextTokenizer(tok)


# ----------------------------------------------------------------------------------------------------
# Manifests and examples

def row_modalities(row):
    """The modalities a manifest row provides, in MODALITIES order."""
    has = {"video": "video" in row or "image" in row,
           "text": "text" in row or "caption" in row,
           "audio": "audio" in row or ("video" in row and row.get("mute", False) is not True)}
    return tuple(m for m in MODALITIES if has[m])


def read_manifest(path):
    """-> list of (line number from 1, dict or an error string); blank lines are skipped."""
    rows = []
    with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark (some editors write one) is not row 1's
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows.append((n, row if isinstance(row, dict) else f"not a JSON object: {line.strip()[:60]}"))
            except json.JSONDecodeError as e:
                rows.append((n, f"invalid JSON: {e}"))
    return rows


def targets_dir(manifest):
    """Where `python data.py tokenize` writes a manifest's VQ targets: beside it, `<name>.targets/`."""
    root, _ = os.path.splitext(manifest)
    return root + ".targets"


def _cache_meta(cfg):
    return {"frames": cfg.frames, "image_size": cfg.image_size, "token_patch": cfg.token_patch,
            "sample_rate": cfg.sample_rate, "max_audio_s": cfg.max_audio_s}


def _row_key(row):
    """The key a target file carries of the manifest row it was made from: files are named by line number,
    so after an edit of the manifest (a row inserted, removed or changed) a line's file may belong to another
    clip; the loader uses a file only when the key matches its row (a changed media file at the same path
    and with the same row is not detected)."""
    return hashlib.sha256(json.dumps(row, sort_keys=True).encode()).hexdigest()[:16]


class ManifestDataset(torch.utils.data.Dataset):
    """One JSON Lines manifest -> examples (dicts of numpy arrays and lists); a bad row raises BadExample.

    An example holds "source", "line", "modalities", and per modality
      "video" uint8 [T, H, W, 3] (images: the same frame T times, and "static": True), "audio" float32 [N]
      at 16 kHz mono,
      "text_ids" list of ids ([CLS] ... [SEP]; videos join caption and transcript, section 4.2.2),
    the downstream label fields present in the row, "video_targets"/"audio_targets" when the manifest
    has an offline VQ-target cache written for this DataConfig ("stale_targets": True instead when the row
    changed since its file was written: the loader says so once per manifest), and "timing" (seconds per stage).
    """

    def __init__(self, path, cfg, tokenizer=None, *, use_targets=True):
        self.path = os.path.abspath(path)
        self.root = os.path.dirname(self.path)
        self.name = os.path.splitext(os.path.basename(path))[0]
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.rows = read_manifest(self.path)
        first = next((r for _, r in self.rows if isinstance(r, dict) and row_modalities(r)), None)
        if first is None:
            raise ValueError(f"{self.path}: no valid row to decide the modalities from ({len(self.rows)} rows)")
        self.modalities = row_modalities(first)
        e = first.get("emotions")
        self.emotions_len = len(e) if isinstance(e, list) else None
        self.targets, self.targets_meta = None, None   # the cache's folder and its meta.json, when used
        tdir = targets_dir(self.path)
        meta_path = os.path.join(tdir, "meta.json")
        if use_targets and os.path.exists(meta_path):
            with open(meta_path) as f:
                meta = json.load(f)
            if all(meta.get(k) == v for k, v in _cache_meta(cfg).items()):
                self.targets, self.targets_meta = tdir, meta
            else:
                print(f"data: ignoring {tdir}: written for {meta}, not {_cache_meta(cfg)}", file=sys.stderr)

    def __len__(self):
        return len(self.rows)

    def line(self, i):
        return self.rows[i][0]

    def _file(self, rel):
        if not isinstance(rel, str) or not rel:
            raise BadExample(f"path must be a non-empty string, got {rel!r}")
        return rel if os.path.isabs(rel) else os.path.join(self.root, rel)

    def __getitem__(self, i):
        line, row = self.rows[i]
        if isinstance(row, str):
            raise BadExample(row)
        try:
            return self._example(line, row)
        except BadExample:
            raise
        except Exception as e:  # a decoder surprise must not stop training: report it with its type
            raise BadExample(f"undecodable ({type(e).__name__}: {e})") from e

    def _example(self, line, row):
        cfg = self.cfg
        unknown = sorted(set(row) - KNOWN_FIELDS)
        if unknown:
            raise BadExample(f"unknown field(s) {unknown}; known: {sorted(KNOWN_FIELDS)}")
        if not isinstance(row.get("mute", False), bool):  # "false" (a string) would otherwise mute the row
            raise BadExample(f"mute must be true or false, got {row['mute']!r}")
        missing = [m for m in self.modalities if m not in row_modalities(row)]
        if missing:
            raise BadExample(f"row lacks {missing} that the manifest's first row provides ({list(self.modalities)})")
        start, end = row.get("start"), row.get("end")
        for k, v in (("start", start), ("end", end)):
            if v is not None and not (_is_number(v) and v >= 0):
                raise BadExample(f"{k} must be a non-negative number of seconds, got {v!r}")
        if start is not None and end is not None and end <= start:
            raise BadExample(f"end ({end}) must be after start ({start})")
        check_labels(row, self.emotions_len)
        ex = {"source": self.name, "line": line, "modalities": self.modalities}
        timing = {}
        if "text" in self.modalities:
            t = time.perf_counter()
            parts = [row[k] for k in ("caption", "text") if k in row]  # caption first: truncation cuts the transcript
            if not all(isinstance(p, str) for p in parts):
                raise BadExample(f"text and caption must be strings, got {[type(p).__name__ for p in parts]}")
            parts = [p.strip() for p in parts if p.strip()]
            if not parts:
                raise BadExample("empty text")
            ex["text"] = " ".join(parts)
            if self.tokenizer is not None:
                ids = self.tokenizer.encode_one(*parts[:2], max_len=cfg.max_text_len)
                if not [x for x in ids if x not in self.tokenizer.special_ids]:
                    raise BadExample(f"text has no tokens: {ex['text'][:60]!r}")
                ex["text_ids"] = ids
            timing["text"] = time.perf_counter() - t
        if "video" in self.modalities:
            t = time.perf_counter()
            if "video" in row:
                ex["video"] = read_video(self._file(row["video"]), cfg.frames, cfg.image_size, start, end)
            else:
                ex["video"] = read_image(self._file(row["image"]), cfg.frames, cfg.image_size)
                ex["static"] = True                   # identical frames: collate masks all of them alike
            timing["video"] = time.perf_counter() - t
        if "audio" in self.modalities:
            t = time.perf_counter()
            own = "audio" not in row                      # the video's own sound track: the video's clock
            src = self._file(row["video"] if own else row["audio"])
            ex["audio"] = read_audio(src, cfg.sample_rate, start, end, cfg.max_audio_s, cfg.min_audio_samples,
                                     video_clock=own)
            timing["audio"] = time.perf_counter() - t
        for k in LABEL_FIELDS:
            if k in row:
                ex[k] = row[k]
        if self.targets is not None:
            p = os.path.join(self.targets, f"{line:08d}.safetensors")
            if os.path.exists(p):
                from safetensors import safe_open
                with safe_open(p, framework="np") as f:
                    if (f.metadata() or {}).get("row") == _row_key(row):
                        ex.update({k: f.get_tensor(k) for k in f.keys()})
                    else:  # the row changed since `tokenize`: its ids are made on the device. Reported by the
                        ex["stale_targets"] = True  # loader's process, not here (a worker's print breaks the bar)
        ex["timing"] = timing
        return ex


# ----------------------------------------------------------------------------------------------------
# Collation: padding and the three masks (section 4.2.1)

def collate(examples, cfg, tokenizer, generator=None):
    """A list of examples from one source -> a batch dict (see the module docstring for the keys).

      video [B, 3, T, H, W] float (normalised, unmasked), video_mask [B, T, H/16, W/16] bool (tube_mask; an
      image's example, "static": True, gets the same 2D mask on all its identical frames)
      text_ids [B, T_l] long (MLM-masked), text_ids_clean [B, T_l], text_attention [B, T_l] bool,
      text_labels [B, T_l] long (-100 where not selected)
      audio [B, N] float, audio_attention [B, N] bool, audio_mask [B, T_s] bool (span_mask_batch over each
      row's true frame count)
      video_targets [B, T, H/16, W/16] long, audio_targets [B, T_s] or [B, T_s, G] long (-100 at padding),
      when the manifest has an offline target cache
      labels {score [B] float, emotions [B, 6] float, label [B] long, answer [B] long, question, answers}
      source, modalities, index [(source, line)]
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    g = generator
    mods = examples[0]["modalities"]
    batch = {"source": examples[0]["source"], "modalities": mods,
             "index": [(e["source"], e["line"]) for e in examples]}
    B = len(examples)
    if "video" in mods:
        u8 = torch.from_numpy(np.stack([e["video"] for e in examples]))  # [B, T, H, W, 3] uint8
        v = torch.empty(u8.permute(0, 4, 1, 2, 3).shape)                 # [B, 3, T, H, W] float, contiguous
        v.copy_(u8.permute(0, 4, 1, 2, 3))
        std = torch.tensor(cfg.std).view(1, 3, 1, 1, 1)
        batch["video"] = v.mul_(1.0 / (255.0 * std)).sub_(torch.tensor(cfg.mean).view(1, 3, 1, 1, 1) / std)
        T, H, W = v.shape[2:]
        batch["video_mask"] = torch.stack([tube_mask(T, H // cfg.token_patch, W // cfg.token_patch, cfg.tube_ratio, g,
                                                     static=e.get("static", False)) for e in examples])
        if all("video_targets" in e for e in examples):
            batch["video_targets"] = torch.stack([torch.as_tensor(e["video_targets"]).long() for e in examples])
    if "text" in mods and tokenizer is not None:
        seqs = [e["text_ids"] if "text_ids" in e else tokenizer.encode_one(e["text"], max_len=cfg.max_text_len)
                for e in examples]
        ids, att = tokenizer.pad(seqs, cfg.max_text_len if cfg.pad_to_max else None)
        special = ~att | torch.isin(ids, torch.tensor(tokenizer.special_ids))
        inputs, labels = mask_tokens(ids, special, tokenizer.mask_id, tokenizer.vocab_size, cfg.text_mask_ratio, g)
        batch.update(text_ids=inputs, text_ids_clean=ids, text_attention=att, text_labels=labels)
    if "audio" in mods:
        lengths = [len(e["audio"]) for e in examples]
        N = max(lengths)
        if cfg.pad_to_max:
            cap = samples_in(cfg.max_audio_s, cfg.sample_rate)   # read_audio's cut
            if N > cap:
                raise ValueError(f"{batch['index'][lengths.index(N)]}: {N} audio samples, more than max_audio_s="
                                 f"{cfg.max_audio_s} at {cfg.sample_rate} Hz ({cap}) that pad_to_max pads to")
            N = cap
        audio = torch.zeros(B, N)
        att = torch.zeros(B, N, dtype=torch.bool)
        for i, e in enumerate(examples):
            audio[i, :lengths[i]] = torch.from_numpy(e["audio"])
            att[i, :lengths[i]] = True
        frames = [int(speech_frames(n)) for n in lengths]
        batch.update(audio=audio, audio_attention=att,
                     audio_mask=span_mask_batch(frames, int(speech_frames(N)), cfg.span_p, cfg.span_len, g))
        if all("audio_targets" in e for e in examples):
            rest = tuple(np.shape(examples[0]["audio_targets"])[1:])  # () or (G,) codebook groups
            tgt = torch.full((B, int(speech_frames(N))) + rest, PAD_LABEL, dtype=torch.long)
            for i, e in enumerate(examples):
                a = torch.as_tensor(e["audio_targets"]).long()[:frames[i]]
                tgt[i, :len(a)] = a
            batch["audio_targets"] = tgt
    labels = {}
    for k, dtype in (("score", torch.float), ("emotions", torch.float), ("label", torch.long), ("answer", torch.long)):
        if all(k in e for e in examples):
            labels[k] = torch.tensor([e[k] for e in examples], dtype=dtype)
    for k in ("question", "answers"):
        if all(k in e for e in examples):
            labels[k] = [e[k] for e in examples]
    if labels:
        batch["labels"] = labels
    return batch


# ----------------------------------------------------------------------------------------------------
# Mixing sources: one source per global step, examples sharded across ranks, exact resume

class MixedBatchSampler:
    """Plans each rank's batches: which source, which rows, and a few spare rows in case some are bad.

    Step k draws its source from `weights` with a generator seeded by (seed, k) alone, so every rank picks
    the same source at the same step (same modalities, same DDP graph). Each source is shuffled once per
    epoch with a generator seeded by (seed, source, epoch); rank r owns positions r, r + W, r + 2W, ... of
    that permutation (n // W of them, so ranks never overlap and all have the same count) and walks its
    share `batch_size` rows per step; a batch never spans two epochs (the tail of an epoch that does not
    fill one is dropped, like drop_last). Every rank advances the same per-source counter, so epochs turn
    over together. Spares are distinct rows of the rank's own share of the current epoch outside the batch
    (so a replaced bad row never duplicates an example of the batch), drawn with a generator seeded by (seed, k, rank).
    The state is {"step": k, "consumed": {source name: rows consumed per rank}}: JSON-able and exact.
    """

    def __init__(self, sizes, weights, batch_size, rank=0, world_size=1, seed=0, spares=2, names=None):
        if len(sizes) != len(weights) or not sizes:
            raise ValueError(f"need one weight per source, got {len(sizes)} sources and {len(weights)} weights")
        w = np.asarray(weights, dtype=np.float64)
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights must be non-negative and not all zero, got {list(weights)}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.names = list(names) if names is not None else [str(i) for i in range(len(sizes))]
        for n, name, wi in zip(sizes, self.names, w):
            if wi > 0 and n // world_size < batch_size:
                raise ValueError(f"source {name} has {n} rows, fewer than batch_size x world_size "
                                 f"({batch_size} x {world_size})")
        self.sizes, self.p = list(sizes), w / w.sum()
        self.batch_size, self.rank, self.world_size, self.seed, self.spares = batch_size, rank, world_size, seed, spares
        self.step = 0
        self.consumed = {name: 0 for name in self.names}
        self._perm = {}

    def source_at(self, step):
        """The source index of global step `step`: a function of (seed, step) only."""
        return int(np.random.default_rng([self.seed, step]).choice(len(self.p), p=self.p))

    def _row(self, s, j):
        """Row index of the j-th row (counting over epochs) of this rank's share of source s."""
        per_rank = self.sizes[s] // self.world_size
        epoch, k = divmod(j, per_rank)
        if self._perm.get(s, (None,))[0] != epoch:
            self._perm[s] = (epoch, np.random.default_rng([self.seed, s, epoch]).permutation(self.sizes[s]))
        return int(self._perm[s][1][self.rank + k * self.world_size])

    def next_plan(self):
        """-> (step, source index, rows, spare rows); advances the state."""
        step, s = self.step, self.source_at(self.step)
        per_rank = self.sizes[s] // self.world_size
        pos = self.consumed[self.names[s]]
        if pos % per_rank + self.batch_size > per_rank:  # a batch never spans two epochs (drop the tail)
            pos = (pos // per_rank + 1) * per_rank
        rows = [self._row(s, j) for j in range(pos, pos + self.batch_size)]
        rng = np.random.default_rng([self.seed, step, self.rank, 1])
        epoch_start, k0 = pos // per_rank * per_rank, pos % per_rank
        n_out = per_rank - self.batch_size  # the share's positions outside this batch, [k0, k0 + batch) skipped
        picks = rng.choice(n_out, min(self.spares, n_out), replace=False) if n_out > 0 else []
        spares = [self._row(s, epoch_start + (int(k) if k < k0 else int(k) + self.batch_size)) for k in picks]
        self.consumed[self.names[s]] = pos + self.batch_size
        self.step += 1
        return step, s, rows, spares

    def __iter__(self):
        while True:
            yield self.next_plan()

    def state_dict(self):
        return {"step": self.step, "consumed": dict(self.consumed), "seed": self.seed, "world_size": self.world_size}

    def load_state_dict(self, d):
        if d.get("seed", self.seed) != self.seed or d.get("world_size", self.world_size) != self.world_size:
            raise ValueError(f"sampler state for seed {d.get('seed')} / world size {d.get('world_size')} "
                             f"cannot resume seed {self.seed} / world size {self.world_size}")
        self.step = int(d["step"])
        self.consumed = {name: int(d["consumed"].get(name, 0)) for name in self.names}


class _BatchMaker:
    """What a DataLoader worker runs per plan: decode rows until the batch is full, skip bad ones, collate."""

    def __init__(self, datasets, cfg, tokenizer, batch_size, seed, rank):
        self.datasets, self.cfg, self.tokenizer = datasets, cfg, tokenizer
        self.batch_size, self.seed, self.rank = batch_size, seed, rank

    def __getitem__(self, plan):
        step, s, rows, spares, state = plan
        ds = self.datasets[s]
        good, skipped, stale, tried = [], [], [], 0
        for i in rows + spares:
            if len(good) == self.batch_size:
                break
            tried += 1
            try:
                ex = ds[i]
            except BadExample as e:
                skipped.append((ds.name, ds.line(i), e.reason))
                continue
            good.append(ex)
            if ex.get("stale_targets"):
                stale.append(ds.line(i))
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, step, self.rank]).generate_state(1)[0]))
        batch = collate(good, self.cfg, self.tokenizer, g) if good else None
        if batch is not None:
            batch["step"] = step
        return {"batch": batch, "step": step, "source": s, "skipped": skipped, "tried": tried, "state": state,
                "stale": stale}


def _identity(x):
    return x


def _worker_init(_, trainer=None):
    """DataLoader worker set-up: one torch thread, and the job's stop signals left to the trainer (pid
    `trainer`), which finishes its step and saves a checkpoint while its workers still serve. torchrun,
    `kill -- -PGID` and Ctrl-C signal the trainer's process group: the worker leaves it. Slurm sends SIGTERM
    to every process: the worker ignores a SIGTERM from anyone but the trainer, whose SIGTERM (how it stops
    its workers at exit) still ends the worker at once. Without sigwaitinfo (macOS) only the first part."""
    torch.set_num_threads(1)
    if hasattr(os, "setpgid"):
        os.setpgid(0, 0)
    if trainer is not None and hasattr(signal, "sigwaitinfo"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # this thread and those it starts

        def wait_for_the_trainer():  # in a thread with SIGTERM blocked: it receives the signal with its sender
            while signal.sigwaitinfo({signal.SIGTERM}).si_pid != trainer:
                pass
            os._exit(0)
        threading.Thread(target=wait_for_the_trainer, daemon=True).start()


class MixedLoader:
    """Iterable of batches mixed from several manifests; see `make_loader`.

    .state_dict() / .load_state_dict(d): the position after the last batch handed out (plus the bad-row
    counters); a new iterator continues with the exact next batch. .bad_counts {source: rows skipped},
    .tried_counts {source: rows tried}, .bad_reasons {source: Counter of reasons}, all of this rank's rows
    (each rank reads its own); .bad_report() sums them up. Iterates forever, or until more than
    `max_bad_share` of a source's rows tried since the loader was made or restored (at least `min_tried` of
    them, or the whole source) are bad: TooManyBadExamples, with the counters as after the last batch.
    """

    def __init__(self, datasets, weights, cfg, tokenizer, batch_size, rank=0, world_size=1, seed=0,
                 num_workers=0, spares=None, report_first=5, min_tried=50, log=None):
        self.datasets, self.cfg, self.tokenizer = datasets, cfg, tokenizer
        spares = max(2, math.ceil(2 * cfg.max_bad_share * batch_size)) if spares is None else spares
        self.sampler = MixedBatchSampler([len(d) for d in datasets], weights, batch_size, rank, world_size, seed,
                                         spares, names=[d.name for d in datasets])
        self.maker = _BatchMaker(datasets, cfg, tokenizer, batch_size, seed, rank)
        self.num_workers, self.report_first, self.min_tried = num_workers, report_first, min_tried
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.bad_counts = {d.name: 0 for d in datasets}
        self.tried_counts = {d.name: 0 for d in datasets}
        self.bad_reasons = {d.name: collections.Counter() for d in datasets}
        self.since_start = {d.name: (0, 0) for d in datasets}  # (bad, tried) since made or restored: the stop rule
        self.stale_reported = set()          # sources whose stale target cache has been reported
        self._state = self.sampler.state_dict()

    def _plans(self):
        self.sampler.load_state_dict(self._state)
        for step, s, rows, spares in self.sampler:
            yield step, s, rows, spares, self.sampler.state_dict()

    def __iter__(self):
        if self.num_workers > 0:
            it = torch.utils.data.DataLoader(self.maker, batch_size=None, sampler=self._plans(), collate_fn=_identity,
                                             num_workers=self.num_workers,
                                             worker_init_fn=functools.partial(_worker_init, trainer=os.getpid()),
                                             prefetch_factor=2, persistent_workers=False,
                                             # its own generator: drawing the workers' base seed from the
                                             # global one would shift every later draw (dropout) of a
                                             # resumed run against an uninterrupted one
                                             generator=torch.Generator().manual_seed(self.sampler.seed))
        else:
            it = (self.maker[p] for p in self._plans())
        for out in it:
            self._account(out)
            self._state = out["state"]
            if out["batch"] is not None:
                yield out["batch"]
            else:  # every plan yields, an all-bad one an empty batch, so that all ranks stay on the same
                ds = self.datasets[out["source"]]  # step (train.common_batch then skips it on every rank)
                yield {"empty": True, "index": [], "source": ds.name, "modalities": ds.modalities, "step": out["step"]}

    def _account(self, out):
        ds = self.datasets[out["source"]]
        name = ds.name
        if out["stale"] and name not in self.stale_reported:
            self.stale_reported.add(name)
            self.log(f"data: {ds.path}:{out['stale'][0]}: the target cache {ds.targets} was written for another "
                     f"row on this line (manifest edited?); such rows get their targets on the device; "
                     f"re-run `python data.py tokenize`")
        reported = sum(self.bad_counts.values())
        for i, (_, line, reason) in enumerate(out["skipped"]):
            if reported + i < self.report_first:
                self.log(f"data: skipped {ds.path}:{line}: {reason}")
        reasons = self.bad_reasons[name] + collections.Counter(reason_kind(r) for _, _, r in out["skipped"])
        # The share is judged on the rows this loader tried since it was made or restored (a run resumed on
        # repaired rows judges them as they are now); the whole run's counts go on in the state and the report.
        bad, tried = (a + b for a, b in zip(self.since_start[name], (len(out["skipped"]), out["tried"])))
        if tried >= min(self.min_tried, len(ds)) and bad > self.cfg.max_bad_share * tried:
            # All counters stay as after the last batch handed out, those of a checkpoint saved at this stop.
            raise TooManyBadExamples(
                f"{ds.path}: {bad} of the {tried} rows tried since this run started or resumed were bad "
                f"({bad / tried:.0%} > max_bad_share {self.cfg.max_bad_share:.0%}); reasons "
                f"{dict(reasons.most_common(5))}. "
                f"Run `python data.py check {ds.path}` for the full list.")
        self.since_start[name] = (bad, tried)
        self.bad_counts[name] += len(out["skipped"])
        self.tried_counts[name] += out["tried"]
        self.bad_reasons[name] = reasons

    def bad_report(self):
        """One line per source with bad rows: how many of the rows tried, and the reasons ("" if none)."""
        return "\n".join(f"data: {ds.path}: {self.bad_counts[ds.name]} of {self.tried_counts[ds.name]} rows tried "
                         f"were bad and skipped; reasons {dict(self.bad_reasons[ds.name].most_common(5))}"
                         for ds in self.datasets if self.bad_counts[ds.name])

    def state_dict(self):
        return {"sampler": dict(self._state), "bad": dict(self.bad_counts), "tried": dict(self.tried_counts),
                "reasons": {k: dict(v) for k, v in self.bad_reasons.items()}}

    def load_state_dict(self, d):
        self._state = dict(d["sampler"])
        self.sampler.load_state_dict(self._state)
        self.bad_counts.update(d.get("bad", {}))
        self.tried_counts.update(d.get("tried", {}))
        for name, reasons in d.get("reasons", {}).items():
            if name in self.bad_reasons:
                self.bad_reasons[name] = collections.Counter(reasons)
        self.since_start = {name: (0, 0) for name in self.since_start}


def make_loader(manifests, weights, cfg, tokenizer, batch_size, rank=0, world_size=1, seed=0, num_workers=0, **kw):
    """Manifests (paths or ManifestDatasets) and mixing weights -> MixedLoader of per-rank batches."""
    datasets = [m if isinstance(m, ManifestDataset) else ManifestDataset(m, cfg, tokenizer) for m in manifests]
    names = [d.name for d in datasets]
    if len(set(names)) != len(names):
        raise ValueError(f"manifest names must differ (they key the sampler state), got {names}")
    return MixedLoader(datasets, weights, cfg, tokenizer, batch_size, rank, world_size, seed, num_workers, **kw)


# ----------------------------------------------------------------------------------------------------
# The toy world: small real media files with learnable cross-modal content (`python data.py make-toy`)
#
# A clip shows one coloured shape moving over a shaded background and a synthetic voice says words about
# it. Every word is a deterministic "syllable" sequence (pitch, two formants, duration from the word's
# hash), so the waveform carries the words' identity and a speech encoder can learn them. Colour, shape
# and motion words are seen, heard and written consistently in the pretraining sources; the downstream
# labels combine a colour seen only in the video, a mood word said only in the audio and a judgement
# written only in the text, so they need all three modalities.

TOY_COLOURS = {"red": (225, 45, 45), "purple": (150, 65, 200), "blue": (50, 90, 230),
               "orange": (245, 145, 30), "yellow": (235, 220, 50), "green": (50, 190, 70)}
TOY_SHAPES = ("circle", "square", "triangle", "cross")
TOY_MOTIONS = ("left", "right", "up", "down")
TOY_MOODS = ("angry", "disgusted", "sad", "scared", "surprised", "happy")          # said (downstream: audio only)
TOY_JUDGEMENTS = ("awful", "bad", "poor", "fine", "good", "great")                 # written (downstream: text only)
TOY_EMOTIONS = ("anger", "disgust", "sadness", "fear", "surprise", "happiness")    # the 6 classes (CMU-MOSEI's)
TOY_VALUES = (-1.0, -0.6, -0.2, 0.2, 0.6, 1.0)  # f(colour), g(mood), h(judgement): the value at the word's index
TOY_FILLERS = ("the", "a", "look", "now", "here", "this", "see", "so", "it", "one")
TOY_QUESTIONS = ("what colour is the shape?", "which feeling does the voice say?",
                 "how does the text judge it?", "which way does the shape move?")
TOY_SIZES = {  # rows per pretraining source, held-out video clips, downstream train / validation / test
    "default": dict(pretrain=400, test=100, train=300, validation=100, downstream_test=100),
    "small": dict(pretrain=64, test=16, train=32, validation=16, downstream_test=16),
    "tiny": dict(pretrain=6, test=4, train=6, validation=3, downstream_test=3),
}
TOY_W, TOY_H, TOY_FPS, TOY_SECONDS = 80, 64, 10, 2.0  # 80x64 frames exercise the resize + centre crop


def _toy_syllables(word):
    """Deterministic (f0 Hz, F1 Hz, F2 Hz, seconds) for each of a word's 1-2 syllables, from its hash."""
    h = hashlib.sha256(word.encode()).digest()
    return [(95 + h[1 + 4 * j] % 90, 300 + h[2 + 4 * j] * 600 // 255, 1000 + h[3 + 4 * j] * 1400 // 255,
             0.11 + (h[4 + 4 * j] % 5) * 0.01) for j in range(1 + h[0] % 2)]


def _toy_syllable(f0, f1, f2, dur, sr):
    n = int(dur * sr)
    t = np.arange(n) / sr
    phase = 2 * np.pi * np.cumsum(f0 * (1 + 0.08 * (0.5 - t / dur))) / sr  # a slightly falling pitch
    k = np.arange(1, int(min(4000, sr / 2 - 200) // f0) + 1)[:, None]
    amp = np.exp(-((k * f0 - f1) / 120.0) ** 2) + 0.8 * np.exp(-((k * f0 - f2) / 180.0) ** 2) + 0.05 / k
    keep = amp[:, 0] > 0.03  # the harmonics near the formants (and the lowest few) carry the word
    wave = (amp[keep] * np.sin(k[keep] * phase)).sum(0) * np.sin(np.pi * t / dur) ** 0.5
    return wave / (np.abs(wave).max() + 1e-9)


def toy_speech(words, sr, rng, max_s):
    """Words -> (float32 waveform of max_s seconds, the words that fit). Speaker pitch and rate vary."""
    pitch, rate = rng.uniform(0.85, 1.15), rng.uniform(0.9, 1.1)
    out, kept = [np.zeros(int(rng.uniform(0.05, 0.15) * sr))], []
    for w in words:
        seg = [_toy_syllable(f0 * pitch, f1, f2, d / rate, sr) for f0, f1, f2, d in _toy_syllables(w)]
        seg.append(np.zeros(int(rng.uniform(0.04, 0.08) * sr)))
        if sum(map(len, out + seg)) > max_s * sr:
            break
        out += seg
        kept.append(w)
    x = np.concatenate(out) * 0.3
    x = np.pad(x, (0, int(max_s * sr) - len(x))) + rng.normal(0, 0.003, int(max_s * sr))
    return x.astype(np.float32), kept


def _toy_frames(rng, colour, shape, motion, n_frames):
    """uint8 [n_frames, TOY_H, TOY_W, 3]: a shape moving over a shaded background (still if n_frames == 1)."""
    base = rng.uniform(70, 150, 3)
    shade = np.linspace(-25, 25, TOY_H)[:, None, None] * rng.choice([-1, 1])
    bg = np.clip(base + shade + np.zeros((TOY_H, TOY_W, 3)), 0, 255)
    r = rng.uniform(8, 12)
    cx, cy, d = TOY_W / 2 + rng.uniform(-4, 4), TOY_H / 2 + rng.uniform(-4, 4), rng.uniform(10, 14)
    dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[motion]
    yy, xx = np.mgrid[0:TOY_H, 0:TOY_W].astype(np.float64)
    out = []
    for f in range(n_frames):
        p = f / (n_frames - 1) - 0.5 if n_frames > 1 else 0.0
        u, v = xx - (cx + 2 * d * p * dx), yy - (cy + 2 * d * p * dy)
        m = {"circle": u * u + v * v <= r * r,
             "square": (np.abs(u) <= 0.85 * r) & (np.abs(v) <= 0.85 * r),
             "triangle": (v <= r * 0.8) & (v >= -r) & (np.abs(u) <= (v + r) * 0.55),
             "cross": ((np.abs(u) <= r / 3) & (np.abs(v) <= r)) | ((np.abs(v) <= r / 3) & (np.abs(u) <= r))}[shape]
        img = bg.copy()
        img[m] = TOY_COLOURS[colour]
        out.append(img.astype(np.uint8))
    return np.stack(out)


def _write_mp4(path, frames, fps, audio=None, sr=16000, rotation=0, keyint=10, pix_fmt="yuv420p", preset="ultrafast",
               fmt="mp4", start_s=0.0, metadata=None):
    """H.264 MP4 (+ AAC audio [C, N] float32) written deterministically; rotation sets the display matrix.
    metadata: tags on the video stream (a legacy `rotate` tag in tests).
    frames: uint8 [T, H, W, 3]; odd H or W need pix_fmt="yuv444p". fmt: the container ("mpegts", "flv" in tests).
    start_s: both streams' first timestamp (a cut broadcast recording starts late; 0: timestamps from 0)."""
    with av.open(path, "w", format=fmt, options={"fflags": "+bitexact"}) as c:
        vs = c.add_stream("libx264", rate=fps, options={"preset": preset, "g": str(keyint), "threads": "1"})
        vs.height, vs.width = frames.shape[1:3]
        vs.pix_fmt = pix_fmt
        vs.codec_context.flags |= av.codec.context.Flags.bitexact
        if rotation:
            vs.set_display_rotation(rotation)
        vs.metadata.update(metadata or {})
        if audio is not None:
            st = c.add_stream("aac", rate=sr, layout="mono" if audio.shape[0] == 1 else "stereo",
                              options={"aac_coder": "fast"})
        for i, img in enumerate(frames):
            f = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            if start_s:
                f.pts = round(start_s * fps) + i
            for p in vs.encode(f):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)
        if audio is not None:
            a = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio.T.reshape(1, -1)), format="flt",
                                           layout="mono" if audio.shape[0] == 1 else "stereo")
            a.sample_rate, a.pts = sr, round(start_s * sr)
            for p in st.encode(a):
                c.mux(p)
            for p in st.encode(None):
                c.mux(p)


def _write_jpeg(path, img):
    cc = av.CodecContext.create("mjpeg", "w")
    cc.width, cc.height, cc.pix_fmt, cc.time_base = img.shape[1], img.shape[0], "yuvj420p", fractions.Fraction(1, 1)
    cc.flags |= av.codec.context.Flags.bitexact
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24").reformat(format="yuvj420p")
    with open(path, "wb") as f:
        for p in cc.encode(frame) + cc.encode(None):
            f.write(bytes(p))


def _toy_item(args):
    """One toy row: (kind, index, seed, out_dir) -> manifest dict (files written under out_dir/kind/)."""
    kind, i, seed, out = args
    rng = np.random.default_rng([seed, ["video", "image_text", "speech_text", "video_speech", "video_test",
                                        "downstream_train", "downstream_validation", "downstream_test"].index(kind), i])
    colour = str(rng.choice(list(TOY_COLOURS)))
    shape, motion = str(rng.choice(TOY_SHAPES)), str(rng.choice(TOY_MOTIONS))
    folder = os.path.join(out, kind)
    n_frames = int(TOY_SECONDS * TOY_FPS)
    stereo48 = i % 4 == 3  # some clips carry 48 kHz stereo audio, some are stored rotated: decoding must cope
    sr = 48000 if stereo48 else 16000

    def video_file(words):
        wave, kept = toy_speech(words, sr, rng, TOY_SECONDS)
        audio = np.stack([wave, wave]) if stereo48 else wave[None]
        frames = _toy_frames(rng, colour, shape, motion, n_frames)
        rotation = 90 if i % 10 == 7 else 0
        if rotation:  # store the frames turned clockwise; the display matrix turns them back
            frames = np.rot90(frames, k=-1, axes=(1, 2))
        name = f"{i:06d}.mp4"
        _write_mp4(os.path.join(folder, name), frames, TOY_FPS, audio, sr, rotation)
        return f"{kind}/{name}", " ".join(kept)

    filler = [str(rng.choice(TOY_FILLERS))]
    extra = [str(rng.choice(TOY_MOODS + TOY_JUDGEMENTS + TOY_FILLERS))]
    if kind in ("video", "video_test"):  # V+L+S: narration = ASR transcript, plus a caption of the visuals
        words = filler + [colour, shape, "moving", motion] + extra
        path, said = video_file(words)
        return {"video": path, "text": said, "caption": f"a {colour} {shape} moving {motion}"}
    if kind == "video_speech":  # V+S: a spoken caption, no text (SMiT-like)
        path, _ = video_file([colour, shape, "moving", motion] + filler)
        return {"video": path}
    if kind == "image_text":  # V+L: a still shape and its caption
        name = f"{i:06d}.jpg"
        _write_jpeg(os.path.join(folder, name), _toy_frames(rng, colour, shape, motion, 1)[0])
        prefix = str(rng.choice(["", "look at", "here is", "this is", "a picture of"]))
        return {"image": f"{kind}/{name}", "text": f"{prefix} a {colour} {shape}".strip()}
    if kind == "speech_text":  # S+L: transcribed speech in varied formats and rates
        vocab = list(TOY_COLOURS) + list(TOY_SHAPES + TOY_MOTIONS + TOY_MOODS + TOY_JUDGEMENTS)
        words = [str(w) for w in rng.choice(vocab, int(rng.integers(3, 6)))]
        fmt, rate, ch = [("flac", 44100, 2), ("wav", 8000, 1), ("wav", 16000, 1), ("wav", 16000, 1)][i % 4]
        wave, kept = toy_speech(words, rate, rng, TOY_SECONDS)
        name = f"{i:06d}.{fmt}"
        soundfile.write(os.path.join(folder, name), np.stack([wave] * ch, 1), rate, format=fmt.upper(),
                        subtype="PCM_16")
        return {"audio": f"{kind}/{name}", "text": " ".join(kept)}
    # downstream: colour only seen, mood only said, judgement only written
    mood, judgement = int(rng.integers(6)), int(rng.integers(6))
    path, said = video_file([shape, "feels", TOY_MOODS[mood]])
    c = list(TOY_COLOURS).index(colour)
    score = TOY_VALUES[c] + TOY_VALUES[mood] + TOY_VALUES[judgement]
    emotions = [int(k in (mood, c)) for k in range(6)]
    q = int(rng.integers(4))
    pool = [list(TOY_COLOURS), list(TOY_MOODS), list(TOY_JUDGEMENTS), list(TOY_MOTIONS)][q]
    right = [colour, TOY_MOODS[mood], TOY_JUDGEMENTS[judgement], motion][q]
    answers = [right] + [str(w) for w in rng.choice([w for w in pool if w != right], 3, replace=False)]
    order = rng.permutation(4)
    return {"video": path, "text": f"the {shape} looks {TOY_JUDGEMENTS[judgement]}", "score": round(score, 2),
            "emotions": emotions, "label": int(score > 0), "question": TOY_QUESTIONS[q],
            "answers": [answers[k] for k in order], "answer": int(np.argmin(order))}


def make_toy(out_dir, seed=0, size="default", workers=None):
    """Write the toy world under out_dir (deterministic in seed and size); returns {manifest name: path}.

    Files: video.jsonl (V+L+S), image_text.jsonl (V+L), speech_text.jsonl (S+L), video_speech.jsonl
    (V+S), video_test.jsonl (held-out V+L+S clips for retrieval), downstream_{train,validation,test}.jsonl
    (V+L+S with score / emotions / label / question / answers / answer), tokenizer.json, toy_world.json.
    """
    n = TOY_SIZES[size] if isinstance(size, str) else size
    os.makedirs(out_dir, exist_ok=True)
    plan = [("video", "video", n["pretrain"]), ("image_text", "image_text", n["pretrain"]),
            ("speech_text", "speech_text", n["pretrain"]), ("video_speech", "video_speech", n["pretrain"]),
            ("video_test", "video_test", n["test"]), ("downstream_train", "downstream_train", n["train"]),
            ("downstream_validation", "downstream_validation", n["validation"]),
            ("downstream_test", "downstream_test", n["downstream_test"])]
    jobs = []
    for _, kind, count in plan:
        os.makedirs(os.path.join(out_dir, kind), exist_ok=True)
        jobs += [(kind, i, seed, out_dir) for i in range(count)]
    workers = workers or min(os.cpu_count() or 1, 8)
    if workers > 1 and len(jobs) > 50:
        import multiprocessing
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            rows = pool.map(_toy_item, jobs, chunksize=8)
    else:
        rows = [_toy_item(j) for j in jobs]
    manifests, k, texts = {}, 0, []
    for name, kind, count in plan:
        manifests[name] = os.path.join(out_dir, f"{name}.jsonl")
        with open(manifests[name], "w") as f:
            for row in rows[k:k + count]:
                f.write(json.dumps(row) + "\n")
                texts += [row[key] for key in ("text", "caption", "question") if key in row] + row.get("answers", [])
        k += count
    vocab = list(TOY_COLOURS) + list(TOY_SHAPES + TOY_MOTIONS + TOY_MOODS + TOY_JUDGEMENTS + TOY_FILLERS)
    train_tokenizer(texts + vocab + ["moving feels looks"], os.path.join(out_dir, "tokenizer.json"), vocab_size=200)
    with open(os.path.join(out_dir, "toy_world.json"), "w") as f:
        json.dump({"seed": seed, "size": n, "colours": TOY_COLOURS, "shapes": TOY_SHAPES, "motions": TOY_MOTIONS,
                   "moods": TOY_MOODS, "judgements": TOY_JUDGEMENTS, "emotions": TOY_EMOTIONS, "values": TOY_VALUES,
                   "score": "values[colour] + values[mood] + values[judgement]; colour only seen, mood only said, "
                            "judgement only written", "emotions_rule": "classes of the mood and of the colour index",
                   "label": "score > 0", "config": dataclasses.asdict(TOY_DATA)}, f, indent=1)
    return manifests


# ----------------------------------------------------------------------------------------------------
# Offline VQ targets (`python data.py tokenize`): <manifest>.targets/{line:08d}.safetensors + meta.json

def target_quantize(model_cfg, name="custom", tokenizers=None):
    """The target tokenizers of a model config (icode.target_tokenizers: the ones ICode itself uses; the
    loaded pretrained ones in `tokenizers` where the config has their architectures, from
    `icode.pretrained_targets` or a checkpoint's model, random projections otherwise) as a callable batch ->
    {"video_targets": [B, T, H/16, W/16] long, "audio_targets": [B, T_s, G] long}, with `.fingerprint`
    (`icode.target_fingerprint`). Any callable of that form can go to `tokenize_manifest`."""
    from icode import target_fingerprint, target_tokenizers, tokenize_targets
    tokenizers = tokenizers or {}
    for k in ("video", "speech"):   # never ids from a pretrained architecture with untrained weights
        if getattr(model_cfg, f"{k}_tokenizer") is not None and k not in tokenizers:
            raise ValueError(f"the config has a pretrained {k} tokenizer's architecture but no loaded tokenizer "
                             f"was given (icode.pretrained_targets, or a checkpoint's model)")
    video_tok, speech_tok = target_tokenizers(model_cfg, **tokenizers)

    def quantize(batch):
        return tokenize_targets(batch, model_cfg, video_tok, speech_tok)
    quantize.fingerprint = target_fingerprint(model_cfg, video_tok, speech_tok)   # train.py compares the model's
    c, kind = model_cfg, lambda arch, pretrained: pretrained if arch else "random projection"
    quantize.__name__ = (f"target tokenizers of the {name} model (video: {kind(c.video_tokenizer, 'VQGAN')}, "
                         f"{c.video_codebook} codes; speech: {kind(c.speech_tokenizer, 'wav2vec 2.0 quantizer')}, "
                         f"{c.speech_groups} x {c.speech_vars} codes; random projections' seed {c.tokenizer_seed})")
    return quantize


def tokenize_manifest(path, cfg, quantize, batch_size=16, name="custom", log=print):
    """Run `quantize(batch) -> {"video_targets", "audio_targets"}` over every good row of a manifest and
    write one safetensors file per line, carrying its row's key (`_row_key`); bad rows are skipped and
    counted. meta.json records `quantize.fingerprint` (None if it has none; train.py then refuses the cache).
    A re-run replaces the whole cache. Returns (written, bad)."""
    from safetensors.numpy import save_file
    ds = ManifestDataset(path, cfg, tokenizer=None, use_targets=False)
    out = targets_dir(ds.path)
    os.makedirs(out, exist_ok=True)
    # A re-run starts from an empty cache: meta.json first (an interrupted re-run leaves no readable cache),
    # then the old files (lines now bad or gone must not keep their old targets).
    for f in sorted(os.listdir(out), key=lambda f: f != "meta.json"):
        if f == "meta.json" or f.endswith(".safetensors"):
            os.remove(os.path.join(out, f))
    written, bad, pending = 0, 0, []

    def flush():
        nonlocal written
        batch = collate(pending, cfg, None, torch.Generator().manual_seed(0))
        with torch.no_grad():
            tgt = quantize(batch)
        for i, e in enumerate(pending):
            arrays = {}
            if "video_targets" in tgt:
                arrays["video_targets"] = tgt["video_targets"][i].cpu().long().numpy()
            if "audio_targets" in tgt:
                arrays["audio_targets"] = tgt["audio_targets"][i, :int(speech_frames(len(e["audio"])))].cpu().long().numpy()
            save_file(arrays, os.path.join(out, f"{e['line']:08d}.safetensors"), metadata={"row": e["row_key"]})
            written += 1
        pending.clear()

    for i in range(len(ds)):
        try:
            pending.append(dict(ds[i], row_key=_row_key(ds.rows[i][1])))
        except BadExample as e:
            bad += 1
            log(f"{ds.path}:{ds.line(i)}: skipped: {e.reason}")
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    with open(os.path.join(out, "meta.json"), "w") as f:  # written last: a half-written cache is never read
        json.dump({**_cache_meta(cfg), "quantizer": name, "tokenizers": getattr(quantize, "fingerprint", None),
                   "rows": written}, f, indent=1)
    return written, bad


# ----------------------------------------------------------------------------------------------------
# check and bench

def check_manifest(path, cfg, tokenizer=None, log=print):
    """Read every row; log `path:line: reason` for each bad one and a summary. Returns (rows, bad rows)."""
    try:
        ds = ManifestDataset(path, cfg, tokenizer, use_targets=False)
    except (OSError, ValueError) as e:
        log(f"{path}: cannot read the manifest: {e}")
        try:
            rows = read_manifest(path) if os.path.isfile(path) else []
        except (OSError, ValueError):  # unreadable as a whole (permissions, not UTF-8): the message above says why
            rows = []
        for line, row in rows:  # why no row could decide the modalities
            if isinstance(row, str):
                log(f"{path}:{line}: {row}")
            elif not row_modalities(row):
                log(f"{path}:{line}: no media or text field ({sorted(row)})")
        return len(rows), max(1, len(rows))
    kinds = collections.Counter()
    for i in range(len(ds)):
        try:
            ds[i]
        except BadExample as e:
            kinds[reason_kind(e.reason)] += 1
            log(f"{ds.path}:{ds.line(i)}: {e.reason}")
    bad = sum(kinds.values())
    log(f"{ds.path}: {len(ds)} rows, {bad} bad ({bad / max(1, len(ds)):.1%}), modalities {'+'.join(ds.modalities)}"
        + (f"; {dict(kinds.most_common())}" if bad else ""))
    return len(ds), bad


def make_bench_clip(out_dir, seconds=8.0, width=640, height=360, fps=30, sr=48000):
    """A 360p H.264 clip with 48 kHz stereo AAC audio and a one-row manifest: the paper preset's clip shape."""
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(0)
    n = int(seconds * fps)
    yy, xx = np.mgrid[0:height, 0:width]
    frames = np.empty((n, height, width, 3), np.uint8)
    for f in range(n):  # moving gradients and noise: H.264 has real work to do
        frames[f, ..., 0] = (xx + 4 * f) % 256
        frames[f, ..., 1] = (yy + 2 * f) % 256
        frames[f, ..., 2] = rng.integers(0, 64, (height, width))
    audio = (0.1 * rng.standard_normal((2, int(seconds * sr)))).astype(np.float32)
    path = os.path.join(out_dir, "clip360p.mp4")
    with av.open(path, "w", format="mp4") as c:  # encoded as a phone or YouTube would: medium preset, 2 s GOP
        vs = c.add_stream("libx264", rate=fps, options={"preset": "veryfast", "g": str(2 * fps)})
        vs.width, vs.height, vs.pix_fmt = width, height, "yuv420p"
        st = c.add_stream("aac", rate=sr, layout="stereo", options={"aac_coder": "fast"})
        for img in frames:
            for p in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)
        a = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio.T.reshape(1, -1)), format="flt", layout="stereo")
        a.sample_rate, a.pts = sr, 0
        for p in st.encode(a) + st.encode(None):
            c.mux(p)
    manifest = os.path.join(out_dir, "bench360p.jsonl")
    with open(manifest, "w") as f:
        f.write(json.dumps({"video": "clip360p.mp4", "start": 0.1, "end": 7.9,
                            "text": "a moving gradient with noise", "caption": "colourful stripes"}) + "\n")
    return manifest


def bench(path, cfg, tokenizer, n=64, batch_size=8, log=print):
    """Decode `n` examples in this process (one worker, one torch thread) and collate them; log examples/s
    per worker and the seconds per example spent in video decode, audio decode, text and collate."""
    torch.set_num_threads(1)
    ds = ManifestDataset(path, cfg, tokenizer, use_targets=False)
    timing, done, bad, buf = collections.Counter(), 0, 0, []
    g = torch.Generator().manual_seed(0)
    for i in range(len(ds)):  # warm-up on the first good row: imports, codec tables
        try:
            ds[i]
            break
        except BadExample:
            continue
    t0 = time.perf_counter()
    for i in range(n):
        try:
            e = ds[i % len(ds)]
        except BadExample:
            bad += 1
            continue
        timing.update(e["timing"])
        buf.append(e)
        done += 1
        if len(buf) == batch_size:
            t = time.perf_counter()
            collate(buf, cfg, tokenizer, g)
            timing["collate"] += time.perf_counter() - t
            buf = []
    total = time.perf_counter() - t0
    rate = done / total
    log(f"{ds.path}: {done} examples ({bad} bad) in {total:.2f} s: {rate:.1f} examples/s per worker; per example "
        + ", ".join(f"{k} {1000 * v / max(1, done):.1f} ms" for k, v in sorted(timing.items())))
    return rate, {k: v / max(1, done) for k, v in timing.items()}


# ----------------------------------------------------------------------------------------------------
# Command line

def _preset(name):
    return {"paper": PAPER_DATA, "toy": TOY_DATA}[name]


def _find_tokenizer(arg, manifest):
    p = arg or os.path.join(os.path.dirname(os.path.abspath(manifest)), "tokenizer.json")
    return load_tokenizer(p) if os.path.exists(p) else None


def main(argv=None):
    ap = argparse.ArgumentParser(description="i-Code data: toy world, manifest checks, decode benchmark, VQ cache.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("make-toy", help="write the toy world (videos, images, speech, manifests, tokenizer.json)")
    p.add_argument("out_dir", help="folder to write into")
    p.add_argument("--seed", type=int, default=0, help="everything written is a function of the seed and size")
    p.add_argument("--size", default="default", choices=sorted(TOY_SIZES), help="rows per source (see TOY_SIZES)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: the cores, at most 8)")
    p = sub.add_parser("check", help="read every row of manifests; report each bad one with its line and reason")
    p.add_argument("manifests", nargs="+", help="JSON Lines manifests")
    p.add_argument("--preset", default="toy", choices=["toy", "paper"], help="decode at this DataConfig")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: beside the manifest, if any)")
    p = sub.add_parser("bench", help="examples/s per worker and where the time goes")
    p.add_argument("manifest", nargs="?", help="manifest to read (omit with --clip360p)")
    p.add_argument("--clip360p", action="store_true", help="generate a 360p H.264 8 s clip and bench the paper preset")
    p.add_argument("--preset", default=None, choices=["toy", "paper"], help="default: toy, paper with --clip360p")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: beside the manifest; --clip360p trains one)")
    p.add_argument("-n", type=int, default=64, help="examples to decode")
    p.add_argument("--step-batch", type=int, default=24, help="per-GPU batch of a training step (paper preset: 24)")
    p = sub.add_parser("tokenize", help="write VQ target ids beside a manifest (<name>.targets/)")
    p.add_argument("manifests", nargs="+", help="JSON Lines manifests")
    p.add_argument("--preset", default="toy", choices=["toy", "paper"],
                   help="the data and model presets the targets are for (toy: train.py's tiny model)")
    p.add_argument("--batch-size", type=int, default=16, help="examples per quantizer call")
    p.add_argument("--video-tokenizer", default=None, help="a pretrained VQGAN folder (as train.py's flag)")
    p.add_argument("--speech-tokenizer", default=None, help="a Wav2Vec2ForPreTraining folder (as train.py's flag)")
    p.add_argument("--ckpt", default=None,
                   help="the target tokenizers of this train.py checkpoint (e.g. a run's --init) instead")
    args = ap.parse_args(argv)

    if args.cmd == "make-toy":
        t = time.perf_counter()
        m = make_toy(args.out_dir, args.seed, args.size, args.workers)
        print(f"wrote the toy world ({args.size}, seed {args.seed}) to {args.out_dir} in {time.perf_counter() - t:.1f} s: "
              + ", ".join(f"{k} {sum(1 for _ in open(v))}" for k, v in m.items()))
        return 0
    if args.cmd == "check":
        bad = 0
        for m in args.manifests:
            bad += check_manifest(m, _preset(args.preset), _find_tokenizer(args.tokenizer, m))[1]
        print(f"{len(args.manifests)} manifest(s), {bad} bad row(s)")
        return 1 if bad else 0
    if args.cmd == "bench":
        if args.clip360p:
            import atexit
            import tempfile
            folder = tempfile.mkdtemp(prefix="icode_bench_")
            atexit.register(shutil.rmtree, folder, True)
            args.manifest = make_bench_clip(folder)
            tok = _find_tokenizer(args.tokenizer, args.manifest) or train_tokenizer(
                ["a moving gradient with noise", "colourful stripes"], os.path.join(folder, "tokenizer.json"), 100)
        elif args.manifest is None:
            ap.error("bench needs a manifest or --clip360p")
        else:
            tok = _find_tokenizer(args.tokenizer, args.manifest)
        cfg = _preset(args.preset or ("paper" if args.clip360p else "toy"))
        rate, _ = bench(args.manifest, cfg, tok, n=args.n)
        if rate == 0:
            print(f"{args.manifest}: no good row decoded (`python data.py check` says why)", file=sys.stderr)
            return 1
        for step_s in (0.25, 0.5):
            need = args.step_batch / step_s
            print(f"a GPU step of batch {args.step_batch} every {step_s} s needs {need:.0f} examples/s: "
                  f"{math.ceil(need / rate)} workers (cores) at this rate")
        return 0
    if args.cmd == "tokenize":
        from icode import preset, pretrained_targets
        cfg = _preset(args.preset)
        model = {"toy": "tiny", "paper": "paper"}[args.preset]     # the model preset trained on that data
        if args.ckpt:
            if args.video_tokenizer or args.speech_tokenizer:
                ap.error("--ckpt brings its own target tokenizers: drop --video-tokenizer / --speech-tokenizer")
            from train import check_preset, load_target_tokenizers
            check_preset(args.ckpt, model)
            model_cfg, toks = load_target_tokenizers(args.ckpt)
            q = target_quantize(model_cfg, f"{model} model of {args.ckpt}", toks)
        else:
            fields, toks = pretrained_targets(args.video_tokenizer, args.speech_tokenizer)
            q = target_quantize(dataclasses.replace(preset(model), **fields), model, toks)
        for m in args.manifests:
            written, bad = tokenize_manifest(m, cfg, q, args.batch_size, name=q.__name__)
            print(f"{m}: wrote {written} target files to {targets_dir(m)} ({bad} bad rows skipped)")
        return 0


if __name__ == "__main__":
    sys.exit(main())
