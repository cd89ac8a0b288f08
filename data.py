"""Data for i-Code pretraining, the paper's part: masking (section 4.2.1, appendix A.1), then examples to batches.

    mask_tokens   MLM: 30% of text tokens, BERT's 80/10/10 rule (section 4.2.1, footnote 2)
    tube_mask     MVM: a 2D mask of 50% of the token grid repeated over a run of frames (appendix A.1,
                  after Wang et al. 2021, BEVT); an image's static clip is masked in every frame
    span_mask     MSM: HuBERT / wav2vec 2.0 span masking, p = 8%, span l = 10 (section 4.2.1)
    DataConfig    the clip shape and masking settings (section 3: 8 frames; 4.2.1: 30%, 50%, p = 8%, l = 10)
    collate       examples from one source -> a batch with the three masks
    make_loader   manifests -> the pretraining loader (pipeline/: decoding, mixing, bad rows)

Every masking function takes an optional `torch.Generator`, so a collator seeded per step is reproducible.
"""
import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from losses import IGNORE_INDEX as PAD_LABEL  # ignore index of the masked-unit losses
from model.quantizers import IMAGENET_MEAN, IMAGENET_STD
from model.wavlm import SPEECH_KERNELS, SPEECH_STRIDES, conv_output_length
from pipeline.loader import MixedLoader
from pipeline.manifest import ManifestDataset
from pipeline.media import samples_in

# ----------------------------------------------------------------------------------------------------
# Masked language modelling (section 4.2.1, footnote 2)

def mask_tokens(ids, special_mask, mask_id, vocab_size, ratio=0.3, generator=None):
    """BERT-style masking of a batch of token ids, with a per-row count as fairseq draws it.

    ids:          [B, L] long, token ids (padding included)
    special_mask: [B, L] bool, True where the token may not be selected ([CLS], [SEP], padding)
    Each row selects n = int(ratio * e + U[0, 1)) of its e eligible tokens (fairseq's MaskTokensDataset:
    ratio * e in expectation, 30% in the paper), uniformly without replacement; of the selected tokens 80%
    become `mask_id`, 10% a uniformly random id in [0, vocab_size), 10% stay (footnote 2). BERT flips one
    coin per token instead: the same 30% in expectation (README, "Differences from the paper").
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


def span_mask_batch(lengths, max_length=None, p=0.08, span=10, generator=None):
    """Batched `span_mask` that respects each row's true length.

    lengths: [B] true frame counts; generator: one for all rows, or a list of one per row. Returns mask:
    [B, max_length] bool, True is masked, never True at or beyond a row's length (padding is never masked).
    """
    lengths = [int(x) for x in lengths]
    max_length = max(lengths) if max_length is None else max_length
    gens = list(generator) if isinstance(generator, (list, tuple)) else [generator] * len(lengths)
    out = torch.zeros(len(lengths), max_length, dtype=torch.bool)
    for i, (n, g) in enumerate(zip(lengths, gens)):
        if n > max_length:
            raise ValueError(f"row {i} has length {n} > max_length {max_length}")
        if n > 0:
            out[i, :n] = span_mask(n, p, span, g)
    return out


# ----------------------------------------------------------------------------------------------------
# The clip shape and masking settings

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


# ----------------------------------------------------------------------------------------------------
# Collation: padding and the three masks (section 4.2.1)

def collate(examples, cfg, tokenizer, generator=None):
    """A list of examples from one source -> a batch dict (see the module docstring for the keys).

    generator: a torch.Generator for all the masks, or a list of them, one per example: each example's three
    masks are drawn from its own generator alone, on its own unpadded length, so they do not depend on the
    other examples of the batch (the loader seeds them by (seed, step, row): the same masks whatever the number
    of processes). None: torch's global generator.

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
    gens = list(generator) if isinstance(generator, (list, tuple)) else [generator] * len(examples)
    if len(gens) != len(examples):
        raise ValueError(f"{len(gens)} generators for {len(examples)} examples")
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
                                                     static=e.get("static", False)) for e, g in zip(examples, gens)])
        if all("video_targets" in e for e in examples):
            batch["video_targets"] = torch.stack([torch.as_tensor(e["video_targets"]).long() for e in examples])
    if "text" in mods and tokenizer is not None:
        batch.update(_masked_text(examples, cfg, tokenizer, gens))
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
                     audio_mask=span_mask_batch(frames, int(speech_frames(N)), cfg.span_p, cfg.span_len, gens))
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


def _masked_text(examples, cfg, tokenizer, gens):
    """The text fields of a batch: each row masked on its own length ([CLS], [SEP] and padding never), then
    padded: {"text_ids", "text_ids_clean", "text_attention", "text_labels"} (see `collate`)."""
    seqs = [e["text_ids"] if "text_ids" in e else tokenizer.encode_one(e["text"], max_len=cfg.max_text_len)
            for e in examples]
    ids, att = tokenizer.pad(seqs, cfg.max_text_len if cfg.pad_to_max else None)
    inputs, labels = ids.clone(), torch.full_like(ids, PAD_LABEL)
    specials = torch.tensor(tokenizer.special_ids)
    for i, (seq, g) in enumerate(zip(seqs, gens)):
        row = ids[i:i + 1, :len(seq)]
        inputs[i, :len(seq)], labels[i, :len(seq)] = (t[0] for t in mask_tokens(
            row, torch.isin(row, specials), tokenizer.mask_id, tokenizer.vocab_size, cfg.text_mask_ratio, g))
    return {"text_ids": inputs, "text_ids_clean": ids, "text_attention": att, "text_labels": labels}


def to_device(batch, device):
    """A collated batch with its tensors on `device` (the rest as it is)."""
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def make_loader(manifests, weights, cfg, tokenizer, batch_size, rank=0, world_size=1, seed=0, num_workers=0, **kw):
    """Manifests (paths or ManifestDatasets) and mixing weights -> the pretraining loader of per-rank batches
    (pipeline/loader.py `MixedLoader`: one source per step, bad rows skipped, resumable), made by `collate`."""
    datasets = [m if isinstance(m, ManifestDataset) else ManifestDataset(m, cfg, tokenizer) for m in manifests]
    names = [d.name for d in datasets]
    if len(set(names)) != len(names):
        raise ValueError(f"manifest names must differ (they key the sampler state), got {names}")
    return MixedLoader(datasets, weights, functools.partial(collate, cfg=cfg, tokenizer=tokenizer), batch_size, rank,
                       world_size, seed, num_workers, max_bad_share=cfg.max_bad_share, **kw)
