"""Data for i-Code pretraining: masking (paper section 4.2.1, appendix A.1), media decoding, batches.

This part: the three masking strategies, written so that each can be read next to the paper.

    mask_tokens   MLM: 30% of text tokens, BERT's 80/10/10 rule (section 4.2.1, footnote 2)
    tube_mask     MVM: a 2D mask of 50% of the token grid repeated over a run of frames (appendix A.1,
                  after Wang et al. 2021, BEVT)
    span_mask     MSM: HuBERT / wav2vec 2.0 span masking, p = 8%, span l = 10 (section 4.2.1)

Every function takes an optional `torch.Generator`, so a collator seeded per step is reproducible.
"""
import math

import torch


# ----------------------------------------------------------------------------------------------------
# Masked language modelling (section 4.2.1, footnote 2)

def mask_tokens(ids, special_mask, mask_id, vocab_size, ratio=0.3, generator=None):
    """BERT-style masking of a batch of token ids.

    ids:          [B, L] long, token ids (padding included)
    special_mask: [B, L] bool, True where the token may not be selected ([CLS], [SEP], padding)
    Selects each eligible token independently with probability `ratio` (30% in the paper); of the
    selected tokens 80% become `mask_id`, 10% a uniformly random id in [0, vocab_size), 10% stay.
    Returns (inputs [B, L] long, labels [B, L] long): labels hold the original id at selected positions
    and -100 elsewhere (the ignore index of `losses.masked_unit_loss`).
    """
    if ids.shape != special_mask.shape:
        raise ValueError(f"ids {tuple(ids.shape)} and special_mask {tuple(special_mask.shape)} differ in shape")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    g = generator
    u = torch.rand(ids.shape, generator=g, device=ids.device)
    selected = (u < ratio) & ~special_mask.bool()
    labels = torch.where(selected, ids, torch.full_like(ids, -100))
    # One more uniform draw per position decides the replacement: [0, .8) mask, [.8, .9) random, [.9, 1) keep.
    r = torch.rand(ids.shape, generator=g, device=ids.device)
    random_ids = torch.randint(0, vocab_size, ids.shape, generator=g, device=ids.device)
    inputs = torch.where(selected & (r < 0.8), torch.full_like(ids, mask_id), ids)
    inputs = torch.where(selected & (r >= 0.8) & (r < 0.9), random_ids, inputs)
    return inputs, labels


# ----------------------------------------------------------------------------------------------------
# Masked vision modelling: tube masking (appendix A.1)

def tube_mask(frames, height, width, ratio=0.5, generator=None):
    """3D tube mask on the visual-token grid (appendix A.1; Wang et al. 2021).

    The grid is the MVM prediction grid: `frames` = T, `height` = H/16, `width` = W/16 (one PeCo token
    per 16x16 patch of each frame, eq. (4)). Draws
      - one 2D mask with exactly round(ratio * height * width) positions (50% in the paper),
      - a tube length l uniform in [ceil(frames/2), frames],
      - a start frame t uniform in [0, frames - l],
    and masks the 2D positions in frames t .. t+l-1 and nowhere else (no wrap-around).
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
    fairseq's `compute_mask_indices` calls the same p "mask_prob" and draws starts only from
    [0, length - span]; we draw from the whole sequence and clip, which keeps the coverage of the last
    frames equal to the others'. Returns mask: [length] bool, True is masked.
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
