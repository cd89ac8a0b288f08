"""Static shapes for CUDA graphs (`--compile --compile-mode reduce-overhead`).

CUDA graphs capture only a step without device syncs and with fixed shapes. The masked-unit heads select the
masked positions (model/heads.py `select_masked`), a count only the device knows. Here instead each head
selects a fixed number of rows, a bound on that count known from the masking settings and the batch's shapes
alone (`masked_rows`), padded with rows labelled -100 that the loss ignores: the same loss and gradients
(tests/test_static_rows.py), no sync. `check_masked_rows` checks each batch against the bounds on the host.

    mask_tokens_max / tube_mask_max / span_mask_max   the most positions each masking function of data.py masks
    masked_rows(cfg, batch)                           {modality: rows} for a collated batch
    static_selection(cfg, batch)                      {modality: the fixed-size selection} for ICode's heads
"""
import functools
import math

import torch

from losses import IGNORE_INDEX
from model.heads import masked_positions


def static_rows_config(args, dcfg):
    """The masking settings that size the heads' selections (train.PretrainObjective.static_rows) under
    --compile-mode reduce-overhead: CUDA graphs capture only a step without device syncs and with static
    shapes, so the heads select `masked_rows` rows (padded, the loss unchanged) instead of exactly the
    masked positions. Otherwise None (the exact selection: fewer rows, one sync per head)."""
    return dcfg if args.compile and args.compile_mode == "reduce-overhead" else None


def mask_tokens_max(length, ratio=0.3):
    """The most tokens `data.mask_tokens` selects in a row of `length`: int(ratio * e + U) <= floor(ratio * L) + 1
    for e <= L eligible tokens (the + 1 also covers the rounding of ratio * e + U up to an integer)."""
    return min(length, math.floor(ratio * length) + 1)


def tube_mask_max(frames, height, width, ratio=0.5):
    """The most cells `data.tube_mask` masks: round(ratio * height * width) in each of at most `frames` frames."""
    return frames * int(round(ratio * height * width))


def span_mask_max(length, p=0.08, span=10):
    """The most frames `data.span_mask` masks in a sequence of at most `length` frames: int(p * n + U) <=
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
    are masked (`select_masked_static`): no device sync, static shapes, so CUDA graphs can capture the
    step. It holds for masks drawn by data.py's masking functions with `cfg`'s settings, as `data.collate` and
    tools/benchmark.py's synthetic batch draw them; `check_masked_rows` checks a batch on the host."""
    return {k: batch[key].shape[0] * bound for k, (key, bound) in _example_bounds(cfg, batch).items()}


def check_masked_rows(cfg, batch):
    """ValueError if an example of a (host) batch has more masked positions than `masked_rows` allows for it:
    the heads' static selection would otherwise rely on a device-side assertion alone."""
    for k, (key, bound) in _example_bounds(cfg, batch).items():
        t = batch[key]
        n = (t != IGNORE_INDEX if key == "text_labels" else t).flatten(1).sum(1)        # [B] masked per example
        if (n > bound).any():
            i = int(n.argmax())
            raise ValueError(f"example {i} of a batch from source {batch.get('source')!r} has {int(n[i])} masked "
                             f"{k} positions, more than the {bound} its shape allows under the masking settings "
                             f"(text_mask_ratio={cfg.text_mask_ratio}, tube_ratio={cfg.tube_ratio}, "
                             f"span_p={cfg.span_p}, span_len={cfg.span_len}): the heads' static selection "
                             f"(--compile-mode reduce-overhead, training/static_rows.py) would not hold them")


def select_masked_static(x, labels, rows):
    """`model.heads.select_masked` with a fixed M = rows, a bound on the number of masked positions
    (`masked_rows`): the masked positions in row-major order, then padding rows (position 0, labels -100, which
    the loss ignores). Static shapes, no device sync. A count above the bound is a device-side assertion (Triton
    may compile it out: train.py checks each batch on the host first, `check_masked_rows`)."""
    keep = masked_positions(x, labels)                                        # [*S]
    count = keep.sum()
    torch._assert_async(count <= rows, "more masked positions than the static bound rows (masked_rows)")
    idx = torch.nonzero_static(keep, size=rows, fill_value=0).unbind(1)      # len(S) x [rows], 0 past count
    pad = torch.arange(rows, device=labels.device) >= count                  # [rows] True at padding rows
    picked = labels[idx]
    return x[idx], picked.masked_fill(pad.view(-1, *[1] * (picked.dim() - 1)), IGNORE_INDEX)


def static_selection(cfg, batch):
    """{modality: select_masked_static with that modality's `masked_rows`}: what ICode.masked_unit_logits takes
    as `select`."""
    return {m: functools.partial(select_masked_static, rows=n) for m, n in masked_rows(cfg, batch).items()}
