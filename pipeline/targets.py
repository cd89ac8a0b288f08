"""Offline VQ targets (`python -m pipeline tokenize`): the ids the model's frozen target tokenizers (section 4.2.1)
would compute on the device, written once beside a manifest so that training reads them instead.
"""
import json
import os

import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from data import collate, speech_frames
from icode import checkpoint_config, target_fingerprint, target_tokenizers, tokenize_targets
from model.weights import load_state_strict
from pipeline.manifest import ManifestDataset, cache_meta, row_key, targets_dir
from pipeline.media import BadExample


def target_quantize(model_cfg, name="custom", tokenizers=None):
    """The target tokenizers of a model config (icode.target_tokenizers: the ones ICode itself uses; the
    loaded pretrained ones in `tokenizers` where the config has their architectures, from
    `icode.pretrained_targets` or a checkpoint's model, random projections otherwise) as a callable batch ->
    {"video_targets": [B, T, H/16, W/16] long, "audio_targets": [B, T_s, G] long}, with `.fingerprint`
    (`icode.target_fingerprint`). Any callable of that form can go to `tokenize_manifest`."""
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
    write one safetensors file per line, carrying its row's key (`row_key`); bad rows are skipped and
    counted. meta.json records `quantize.fingerprint` (None if it has none; train.py then refuses the cache).
    A re-run replaces the whole cache. Returns (written, bad)."""
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
            pending.append(dict(ds[i], row_key=row_key(ds.rows[i][1])))
        except BadExample as e:
            bad += 1
            log(f"{ds.path}:{ds.line(i)}: skipped: {e.reason}")
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    with open(os.path.join(out, "meta.json"), "w") as f:  # written last: a half-written cache is never read
        json.dump({**cache_meta(cfg), "quantizer": name, "tokenizers": getattr(quantize, "fingerprint", None),
                   "rows": written}, f, indent=1)
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
