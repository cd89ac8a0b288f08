"""Offline VQ targets (`python -m pipeline tokenize`): the ids the model's frozen target tokenizers (section 4.2.1)
would compute on the device, written once beside a manifest (pipeline/target_cache.py) so that training reads
them instead; under torchrun every rank writes its share of the shards.
"""
import os

import torch
from safetensors import safe_open

from data import collate, speech_frames, to_device
from icode import checkpoint_config, target_fingerprint, target_tokenizers, tokenize_targets
from model.weights import load_state_strict
from pipeline.manifest import ManifestDataset
from pipeline.media import BadExample, samples_in
from pipeline.target_cache import SHARD_ROWS, TargetCache, cache_meta, row_key, targets_dir


def target_quantize(model_cfg, name="custom", tokenizers=None, device="cpu"):
    """The target tokenizers of a model config (icode.target_tokenizers: the ones ICode itself uses; the
    loaded pretrained ones in `tokenizers` where the config has their architectures, from
    `icode.pretrained_targets` or a checkpoint's model, random projections otherwise) as a callable batch ->
    {"video_targets": [B, T, H/16, W/16] long, "audio_targets": [B, T_s, G] long}, with `.fingerprint`
    (`icode.target_fingerprint`), run on `device`. Any callable of that form can go to `tokenize_manifest`."""
    tokenizers = tokenizers or {}
    for k in ("video", "speech"):   # never ids from a pretrained architecture with untrained weights
        if getattr(model_cfg, f"{k}_tokenizer") is not None and k not in tokenizers:
            raise ValueError(f"the config has a pretrained {k} tokenizer's architecture but no loaded tokenizer "
                             f"was given (icode.pretrained_targets, or a checkpoint's model)")
    video_tok, speech_tok = (t.to(device) for t in target_tokenizers(model_cfg, **tokenizers))

    def quantize(batch):
        return tokenize_targets(to_device(batch, device), model_cfg, video_tok, speech_tok)
    quantize.fingerprint = target_fingerprint(model_cfg, video_tok, speech_tok)   # train.py compares the model's
    c, kind = model_cfg, lambda arch, pretrained: pretrained if arch else "random projection"
    quantize.__name__ = (f"target tokenizers of the {name} model (video: {kind(c.video_tokenizer, 'VQGAN')}, "
                         f"{c.video_codebook} codes; speech: {kind(c.speech_tokenizer, 'wav2vec 2.0 quantizer')}, "
                         f"{c.speech_groups} x {c.speech_vars} codes; random projections' seed {c.tokenizer_seed})")
    return quantize


def tokenize_manifest(path, cfg, quantize, batch_size=16, name="custom", log=print, rank=0, world=1, barrier=None):
    """Run `quantize(batch) -> {"video_targets", "audio_targets"}` over the good rows of a manifest and store
    each row's ids with its key in the manifest's sharded cache (pipeline/target_cache.py). meta.json records
    `quantize.fingerprint` (None if it has none; train.py then refuses the cache). Rows whose ids the cache
    already holds for the row as it is now are skipped: an interrupted or repeated run goes on where it stopped
    (a cache of other tokenizers or another clip shape is started afresh). Under torchrun, rank r of `world`
    does the shards r, r + world, ...; `barrier()` (all ranks) follows rank 0's preparing of the folder.
    Returns (rows written, bad rows); rows already there count as neither."""
    ds = ManifestDataset(path, cfg, tokenizer=None, use_targets=False)
    meta = {**cache_meta(cfg), "quantizer": name, "tokenizers": getattr(quantize, "fingerprint", None),
            "rows": len(ds), "shard_rows": SHARD_ROWS,
            "audio_frames": int(speech_frames(samples_in(cfg.max_audio_s, cfg.sample_rate)))}
    if rank == 0:
        TargetCache.prepare(ds.path, meta)               # the folder, emptied first if it held another cache
    if barrier is not None:
        barrier()
    cache = TargetCache(targets_dir(ds.path), meta, mode="w")
    written, bad, pending = 0, 0, []

    def flush():
        nonlocal written
        batch = collate([e for _, _, e in pending], cfg, None, torch.Generator().manual_seed(0))
        with torch.no_grad():
            tgt = quantize(batch)
        for b, (i, row, e) in enumerate(pending):
            arrays = {}
            if "video_targets" in tgt:
                arrays["video_targets"] = tgt["video_targets"][b].cpu().numpy()
            if "audio_targets" in tgt:
                arrays["audio_targets"] = tgt["audio_targets"][b, :int(speech_frames(len(e["audio"])))].cpu().numpy()
            cache.write(i, row, arrays)
            written += 1
        cache.flush()
        pending.clear()

    n_shards = -(-len(ds) // SHARD_ROWS)
    for shard in range(rank, n_shards, world):
        for i in range(shard * SHARD_ROWS, min(len(ds), (shard + 1) * SHARD_ROWS)):
            row = ds.row(i)
            if isinstance(row, dict) and cache.key(i) == row_key(row):
                continue                                      # done by an earlier run
            try:
                pending.append((i, row, ds[i]))
            except BadExample as e:
                bad += 1
                log(f"{ds.path}:{ds.line(i)}: skipped: {e.reason}")
            if len(pending) == batch_size:
                flush()
        if pending:
            flush()
    return written, bad


def checkpoint_target_tokenizers(ckpt):
    """A checkpoint's config and its pretrained target tokenizers {"video": ..., "speech": ...} (those its config
    has architectures for; `icode.pretrained_targets` returns loaded ones the same way), their weights read from
    model.safetensors, without building the rest of the model (the paper preset's is 742M parameters). Random
    projections hold no weights there and are left to `icode.target_tokenizers`, which rebuilds them from the
    config's seed as the model does."""
    cfg = checkpoint_config(ckpt)
    toks = {k: t for k, t in zip(("video", "speech"), target_tokenizers(cfg))
            if getattr(cfg, f"{k}_tokenizer") is not None}
    path = os.path.join(ckpt, "model.safetensors")
    if toks:
        with safe_open(path, "pt") as f:
            keys = list(f.keys())
            for name, tok in toks.items():
                prefix = f"{name}_tokenizer."
                state = {k[len(prefix):]: f.get_tensor(k) for k in keys if k.startswith(prefix)}
                load_state_strict(tok, state, source=f"{path} ({prefix}*)")
    return cfg, toks
