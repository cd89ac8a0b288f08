"""i-Code pretraining (paper section 4.2) with torch DDP, gradient cache and exact resume.

    python train.py                                   # toy world, tiny preset, CPU, a few minutes
    torchrun --nproc_per_node=8 train.py --preset paper --data a.jsonl b.jsonl --batch 24 --accum 1
    python train.py --benchmark --preset paper --batch 24   # one JSON line: speed of the real step

One step (section 4.2): the encoders run once on the masked inputs; the merged fusion pass feeds the
MLM / MVM / MSM heads (4.2.1); each modality also goes through the fusion network alone and is mean-pooled
for the contrastive losses (4.2.2); eq. (3) combines them. The contrastive batch is the global batch:
negatives come from every GPU (losses.info_nce gathers with gradients) and, with --accum > 1, from every
micro-batch through gradient cache (Gao et al. 2021):
  1. representations of every micro-batch without gradients (RNG state saved per micro-batch);
  2. the contrastive loss on all of them and its gradient with respect to the representations;
  3. each micro-batch again with gradients (RNG restored, so dropout matches), backpropagating the masked
     unit losses plus <representations, cached gradient>; DDP syncs only on the last micro-batch.
"""
import argparse
import collections
import contextlib
import inspect
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
from dataclasses import asdict, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch._dynamo.utils import counters   # Inductor's counts (cudagraph_skips) for the benchmark line
from safetensors import safe_open
from safetensors.torch import load_file, save_file, save_model
from safetensors.torch import load_model as load_safetensors_into

import data as D
from icode import ICode, ICodeConfig, preset, pretrained_targets, target_fingerprint, target_tokenizers
from losses import PAIR_NAMES, PAPER_WEIGHTS, LearnedLossWeights, masked_unit_loss, pretraining_loss
from model.weights import load_state_strict

TERMS = ("mlm", "mvm", "msm", "vl", "vs", "ls")
TOY_DIR = "toy"
TOY_OUT = os.path.join("runs", "toy")
TOY_PRETRAIN = ("video.jsonl", "image_text.jsonl", "speech_text.jsonl", "video_speech.jsonl")  # data.make_toy
TOY_HELDOUT = "video_test.jsonl"   # held-out V+L+S clips: zero-shot retrieval after pretraining


# ----------------------------------------------------------------------------------------------------
# Distributed: torchrun's environment when present, one process otherwise.

class Dist:
    def __init__(self, rank=0, local_rank=0, world=1, device=torch.device("cpu")):
        self.rank, self.local_rank, self.world, self.device = rank, local_rank, world, device
        self.is_main = rank == 0


def setup_distributed(device=None):
    """torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; nccl on GPUs, gloo on CPUs."""
    if int(os.environ.get("RANK", -1)) == -1:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return Dist(device=dev)
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)     # before init_process_group
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank, local_rank, world, torch.device(f"cuda:{local_rank}" if use_cuda else "cpu"))


def print0(*a, **kw):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, **kw, flush=True)


def all_reduce_(t, op=None):
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


# ----------------------------------------------------------------------------------------------------
# Model, optimiser, schedule

def wrap_ddp(module, d):
    """DDP over `module` when there are several processes; the module itself otherwise."""
    if d.world == 1:
        return module
    # The buffers (Swin's position indices, the target tokenizers' projections) are constants: no broadcast
    # before every forward. torch 2.13 renamed the option (the new one still syncs once at start: harmless).
    ddp_params = inspect.signature(nn.parallel.DistributedDataParallel).parameters
    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in ddp_params
                      else {"broadcast_buffers": False})
    return nn.parallel.DistributedDataParallel(
        module, device_ids=[d.local_rank] if d.device.type == "cuda" else None, **no_buffer_sync)


def precision(bf16, device):
    """bf16 autocast ("auto": on GPUs) and TF32 matrix products on GPUs; float32 on CPUs.
    Returns a factory of the autocast context (a no-op context when off)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        # Time cuDNN's algorithms once per input shape and keep the fastest (the speech feature encoder,
        # WavLM's grouped positional convolution; Swin's patch embedding and MVM's deconvolution are matrix
        # products). Frames and the 8 s audio cut keep the shapes few (data.py pads to the batch maximum;
        # with --compile, to the maxima).
        torch.backends.cudnn.benchmark = True
    if bf16 == "on" or (bf16 == "auto" and device.type == "cuda"):
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def torch_version():
    """(major, minor) of the installed torch: (2, 13) for "2.13.0+cpu"."""
    return tuple(int(x) for x in torch.__version__.split(".")[:2])


def static_rows(args, dcfg):
    """The masking settings that size the heads' selections (PretrainObjective.static_rows) under
    --compile-mode reduce-overhead: CUDA graphs capture only a step without device syncs and with static
    shapes, so the heads select data.masked_rows rows (padded, the loss unchanged) instead of exactly the
    masked positions. Otherwise None (the exact selection: fewer rows, one sync per head)."""
    return dcfg if args.compile and args.compile_mode == "reduce-overhead" else None


def compile_step(module, mode="default", backend="inductor", eager_random=False):
    """torch.compile of the pretraining objective as one graph per modality set.

    The heads select the masked positions (model/heads.py), a count that depends on the data: by default
    Dynamo breaks the graph there, 12 breaks in all. Capturing such output shapes keeps the selection in
    the graph, with the count as a symbol: one graph, no recompilation when the count changes
    (tests/test_train.py checks both). The step still waits for the count once per head (the sync of
    `nonzero`). Each modality set a source brings (7 at most) is its own graph, and a batch shortened by
    bad rows (`common_batch`) makes the batch size dynamic once more: room for both beyond Dynamo's default
    of 8 compilations per function (past it a function runs eagerly). cache_size_limit is
    recompile_limit's name before torch 2.7 (both work in later versions). `backend`: tests trace with
    Dynamo alone.

    eager_random: Inductor's generated kernels draw dropout masks from their own seeds, so restoring the RNG
    state does not repeat an eager pass's masks in a compiled one. Gradient cache (train_step with more than
    one micro-batch) computes the cached representations eagerly and recomputes them through this compiled
    module, and needs the same masks both times; `fallback_random` makes Inductor draw them with eager's
    random ops, in eager's order (tests/test_train.py checks the compiled cached step against the eager one,
    tiny preset with dropout on).
    It costs a separate kernel per random draw, so it is on only where needed (train.py: --accum > 1).
    With it the graph breaks at the heads' selections again: inside one graph Inductor may schedule a draw
    that does not depend on a selection ahead of one that does, out of eager's order (seen with torch 2.10.0
    to 2.12.1, not 2.13.0: other masks, gradients off by 1.5-2.7x a tensor's largest entry). Before torch
    2.10 the masks differ even so (2.8.0, 2.9.1: off by 0.84x): refused there."""
    if eager_random and torch_version() < (2, 10):
        raise ValueError(f"--compile with gradient cache (--accum > 1) needs torch >= 2.10, this is "
                         f"{torch.__version__}: its compiled step draws other dropout masks than the eager pass, "
                         f"so the recomputed representations would not be the cached ones. Use --accum 1, leave "
                         f"out --compile, or upgrade torch")
    torch._dynamo.config.capture_dynamic_output_shape_ops = not eager_random
    if eager_random:
        torch._inductor.config.fallback_random = True
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
    return torch.compile(module, backend=backend, **({"mode": mode} if backend == "inductor" else {}))


def load_model(ckpt=None, preset_name="tiny", fusion="merge", text_vocab=None):
    """An ICode from a checkpoint folder (model.safetensors + state.json, architecture from its config)
    or, with ckpt=None, freshly initialised from a preset."""
    if ckpt is None:
        return ICode(preset(preset_name, fusion, text_vocab))
    model = ICode(ICodeConfig.from_dict(read_state(ckpt)["config"]))
    missing, unexpected = load_safetensors_into(model, os.path.join(ckpt, "model.safetensors"), strict=False)
    if missing or unexpected:
        raise KeyError(f"{ckpt}/model.safetensors: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def load_target_tokenizers(ckpt):
    """A checkpoint's config and its pretrained target tokenizers {"video": ..., "speech": ...} (those its config
    has architectures for; `icode.pretrained_targets` returns loaded ones the same way), their weights read from
    model.safetensors, without building the rest of the model (`data.py tokenize --ckpt` needs only these; the
    paper preset's model is 742M parameters). Random projections hold no weights there and are left to
    `icode.target_tokenizers`, which rebuilds them from the config's seed as the model does."""
    cfg = ICodeConfig.from_dict(read_state(ckpt)["config"])
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


def read_state(ckpt):
    """A checkpoint folder's state.json (config, arguments, step, world size, loss history)."""
    path = os.path.join(ckpt, "state.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{ckpt!r} has no state.json (not a train.py checkpoint folder)")
    with open(path) as f:
        return json.load(f)


def check_preset(ckpt, preset_name, fusion=None):
    """A checkpoint's model goes with the data settings (clip shape) and learning rates of the preset it was
    pretrained with: refuse another --preset rather than feed a paper model toy clips, or the reverse; and
    another --fusion (when one is given) than the model's, rather than ignore it. Returns the model's fusion
    mode ("merge" or "co")."""
    state = read_state(ckpt)
    trained, mode = state["args"]["preset"], state["config"]["fusion"]["mode"]
    if trained != preset_name:
        raise ValueError(f"{ckpt} was pretrained with --preset {trained}, this run has --preset {preset_name}: "
                         f"give --preset {trained} (it sets the clip shape and the learning rates)")
    if fusion not in (None, mode):
        raise ValueError(f"{ckpt} was pretrained with {mode} fusion, not --fusion {fusion}")
    return mode


SCALARS = ("logit_scales", "loss_weights")   # ICode's scalars in log space: ln(tau) per pair, the learned s_w


def no_decay(name, p):
    """No weight decay on norms, biases (1-D tensors) and embedding tables (token, relative-position,
    modality, mask, position-bias tables, logit scales), following BERT / CLIP practice. Projections named
    "embed" (Swin's patch embedding, a convolution) are weights like any other and decay."""
    keys = ("word_embeddings", "position_embeddings", "rel_embeddings", "modality_embed", "mask_token",
            "relative_position_bias_table", "rel_attn_embed") + SCALARS
    return p.dim() < 2 or any(k in name for k in keys)


def build_optimizer(model, lr_fusion, lr_encoders, weight_decay, fused=None, lr_scales=None):
    """AdamW with the learning rates of section 4.2.2 (2e-5 fusion and heads, 1e-5 encoders) and a third for
    the scalars in log space, the logit scales ln(tau) and the learned eq. (3) weights' s_w (`lr_scales`,
    default lr_fusion; train.py's --lr-temperature, README "Differences from the paper")."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        top = name.split(".")[0]
        kind = "encoders" if top in ("text", "vision", "speech") else "scales" if top in SCALARS else "fusion"
        groups.setdefault((kind, no_decay(name, p)), []).append(p)
    lr = {"encoders": lr_encoders, "fusion": lr_fusion, "scales": lr_fusion if lr_scales is None else lr_scales}
    param_groups = [{"params": ps, "lr": lr[kind], "base_lr": lr[kind], "weight_decay": 0.0 if nd else weight_decay,
                     "name": kind + ("_no_decay" if nd and kind != "scales" else "")}
                    for (kind, nd), ps in sorted(groups.items())]
    if fused is None:
        fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(param_groups, betas=(0.9, 0.98), eps=1e-6, fused=fused)


def clip_and_step(opt, params, norm, max_norm):
    """The optimiser step on gradients clipped to global L2 norm `max_norm`, given their norm before clipping,
    `norm` (torch.nn.utils.get_total_norm): clip_grad_norm_'s scaling by min(1, max_norm / (norm + 1e-6)).

    A fused AdamW (the GPU's, build_optimizer) takes the scaling into its own kernel: it divides every gradient
    by the optimiser's `grad_scale` as it reads it (the hook torch.amp.GradScaler unscales through), which
    saves clip_grad_norm_'s separate multiplication, a pass reading and writing every gradient (2.2 ms of the
    paper-preset step on an H100, docs/speed.md). Otherwise: clip_grad_norm_'s own multiplication, then the step.
    """
    if all(g.get("fused") for g in opt.param_groups):
        opt.grad_scale = ((norm + 1e-6) / max_norm).clamp(min=1.0).float()  # divide by max(1, norm / max_norm)
        try:
            opt.step()
        finally:
            del opt.grad_scale
    else:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        opt.step()


def grad_norm(params):
    """Global L2 norm of the gradients of `params` (those that have one), as clip_grad_norm_ computes it."""
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])


PAPER_GLOBAL_BATCH = 1728   # section 4.2.2: "effective batch size 1728" on 72 A100 GPUs


def steps_for_epochs(epochs, sampler):
    """Optimiser steps for `epochs` passes over the data (section 4.2.2: "we pretrain for 3 epochs"). One epoch
    is sum_s E_s steps, E_s = the full batches in one epoch of source s (each rank's share of n_s rows in batches
    of the per-rank batch, the tail dropped): every full batch of every source once when the mixing weights
    are proportional to the E_s. Returns (steps, {source: expected passes p_s * steps / E_s})."""
    per_epoch = [sampler.sizes[s] // sampler.world_size // sampler.batch_size for s in range(len(sampler.sizes))]
    steps = math.ceil(epochs * sum(per_epoch))
    return steps, {name: float(p * steps / e) if e else 0.0 for name, p, e in zip(sampler.names, sampler.p, per_epoch)}


def lr_factor(step, warmup, total, decay="cosine"):
    """Linear warm-up over `warmup` steps (section 4.2.2: 20000), then cosine (or linear) decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * frac)) if decay == "cosine" else 1.0 - frac


# ----------------------------------------------------------------------------------------------------
# The step

def count_targets(targets, msm_combined):
    """Masked positions per term (the loss normalisers), [3] float: mlm, mvm, msm."""
    def n(key, combine=False):
        t = targets.get(key)
        if t is None:
            return 0
        if combine and t.dim() == 3:      # per-group ids [B, T_s, G], one combined class per masked frame
            return (t != -100).any(-1).sum()
        return (t != -100).sum()
    dev = next(iter(targets.values())).device if targets else "cpu"
    return torch.stack([torch.as_tensor(n("text"), device=dev), torch.as_tensor(n("video"), device=dev),
                        torch.as_tensor(n("audio", msm_combined), device=dev)]).float()


class PretrainObjective(nn.Module):
    """What DDP wraps: one micro-batch's share of eq. (3), as a scalar whose gradient is exact.

    Masked units: summed cross-entropy over this micro-batch's masked positions divided by the global count
    (all micro-batches, all ranks) and multiplied by the world size (DDP averages gradients over ranks), so
    the gradients add up to those of the single-batch mean, eq. (6).
    Contrastive: without a cache, the InfoNCE terms on this micro-batch (gathered across ranks); with a cache
    (gradient cache), <r, dL/dr> + <tau, dL/dtau> / n_micro whose gradient equals the contrastive one.
    Eq. (3)'s weights: `weights` (fixed), or the model's learned ones (ICode.loss_weights, `eq3`).
    """

    def __init__(self, model, weights, unmasked_contrastive=False, static_rows=None):
        super().__init__()
        self.model, self.weights, self.unmasked_contrastive = model, weights, unmasked_contrastive
        self.static_rows = static_rows   # a DataConfig: heads select data.masked_rows rows (no device sync,
                                         # for CUDA graphs); None: exactly the masked positions (a sync each)

    def check_batch(self, batch):
        """With static_rows, a ValueError if an example has more masked positions than the heads' static
        selection holds (data.check_masked_rows; train.main calls it on the host batch, the benchmark on its
        synthetic one); with the exact selection, nothing."""
        if self.static_rows is not None:
            D.check_masked_rows(self.static_rows, batch)

    def eq3(self, terms, n_micro=1):
        """Eq. (3) over `terms` ({name: term}): the fixed `weights`, or the model's learned weights
        (losses.learned_weights_loss) whose penalty sum_w s_w is shared among the step's n_micro micro-batches
        (so a step adds it once)."""
        learned = self.model.loss_weights
        if learned is None:
            return pretraining_loss(**terms, **self.weights)[0]
        return pretraining_loss(**terms, **learned.weights())[0] + learned.penalty(terms) / n_micro

    def representations(self, batch):
        """Section 4.2.2 representations {m: [b, D]}; masked encoder outputs reused unless configured."""
        if self.unmasked_contrastive and len(batch["modalities"]) < 2:
            return {}, None  # no pair to contrast: no unmasked encoder pass
        feats, valids = self.model.pretrain_features(batch, masked=not self.unmasked_contrastive)
        reps = self.model.contrastive_representations(feats, valids) if len(feats) > 1 else {}
        return reps, (None if self.unmasked_contrastive else (feats, valids))

    def forward(self, batch, targets, norms, world, cache=None, touch=(), n_micro=1):
        # The same order of random draws as the cache pass: representations first.
        reps, feats_valids = self.representations(batch)
        feats, valids = feats_valids or self.model.pretrain_features(batch, masked=True)
        rows = D.masked_rows(self.static_rows, batch) if self.static_rows is not None else None
        logits = self.model.masked_unit_logits(feats, valids, targets, rows)
        idx = {"mlm": 0, "mvm": 1, "msm": 2}
        terms = {k: masked_unit_loss(lg, tg, normalizer=norms[idx[k]]) * world for k, (lg, tg) in logits.items()}
        if cache is None:
            terms.update(self.model.logit_scales(reps))
            loss = self.eq3(terms, n_micro)
        else:   # gradient cache: the contrastive part through the cached gradients (train_step)
            rep_grads, scalar_grads = cache
            loss = self.eq3(terms, n_micro) if terms else 0.0
            loss = loss + sum((reps[m].float() * rep_grads[m]).sum() for m in reps)
            loss = loss + sum(p * g / n_micro for p, g in scalar_grads)
        if touch:  # join unused parameters with coefficient 0 (see ICode.unused_parameters)
            loss = loss + sum(p.reshape(-1)[0] for p in touch) * 0.0
        return loss, {k: v.detach() / world if k in idx else v.detach() for k, v in terms.items()}


def batch_size(batch):
    return next(batch[k].shape[0] for k in ("video", "text_ids", "audio") if k in batch)


def batch_rows(batch, a, b):
    """Examples a:b of a collated batch (tensors and lists with one entry per example; the rest kept)."""
    B = batch_size(batch)
    return {k: (v[a:b] if (torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == B)
                or (isinstance(v, list) and len(v) == B) else v) for k, v in batch.items()}


def split_batch(batch, n):
    """Split a collated batch into n micro-batches along the batch dimension."""
    B = batch_size(batch)
    if B % n:
        raise ValueError(f"batch of {B} does not split into {n} micro-batches")
    b = B // n
    return [batch_rows(batch, i * b, (i + 1) * b) for i in range(n)]


def common_batch(batch, accum, d, manifests=None):
    """The part of this rank's batch that every rank can train on together, or None: skip the step.

    A rank's batch falls short of --batch x --accum when more of its rows are bad than it has spares, and
    is empty ({"empty": True}) when all are (data.py). DDP and the gathered contrastive loss need the same
    batch on every rank, so every rank keeps its first n examples, n = the smallest batch over the ranks
    rounded down to a multiple of accum; with n = 0 every rank skips the step (not one alone, which would
    leave the others waiting in DDP's all-reduce).

    A rank whose loader stopped on too many bad rows brings {"stop": its message} instead of a batch, and the
    same all-reduce carries that (as -1 - rank) to the others: every rank raises D.TooManyBadExamples
    together, so that train.main saves a checkpoint on all of them rather than one rank exiting alone. The
    others' message names the source the step draws from (all ranks draw from the same one) and, given
    `manifests` ({source name: manifest path}), its manifest."""
    n = -1 - d.rank if "stop" in batch else 0 if batch.get("empty") else batch_size(batch)
    n_all = int(all_reduce_(torch.tensor([n], device=d.device), dist.ReduceOp.MIN).item())
    if n_all < 0:
        src = batch.get("source")
        where = f"{manifests[src]}; " if src in (manifests or {}) else ""
        raise D.TooManyBadExamples(batch.get("stop") or f"rank {-1 - n_all} stopped on too many bad rows of "
                                                        f"source {src} ({where}that rank's message has the "
                                                        f"counts and reasons).")
    n_all -= n_all % accum
    if n_all == 0:
        return None
    return batch if n_all == n else batch_rows(batch, 0, n_all)


def check_target_caches(datasets, model):
    """Offline VQ targets (`data.py tokenize`) stand in for the model's own tokenizers (section 4.2.1), so
    they must come from the same ones: a cache whose meta.json fingerprint (`icode.target_fingerprint`)
    differs from the model's, e.g. written with another tokenizer seed or other pretrained tokenizers, or with
    none, is an error naming the cache; otherwise one source's targets would come from another codebook than
    the rest's. (A cache written for another clip shape never gets here: the loader does not use it.)"""
    own = target_fingerprint(model.cfg, model.video_tokenizer, model.speech_tokenizer)
    for ds in datasets:
        if ds.targets is not None and ds.targets_meta.get("tokenizers") != own:
            raise ValueError(f"{ds.targets}: the target cache was written by tokenizers "
                             f"{ds.targets_meta.get('tokenizers')} ({ds.targets_meta.get('quantizer')}), the model's "
                             f"are {own}: rerun `python data.py tokenize` with the run's --preset, --video-tokenizer "
                             f"and --speech-tokenizer (or --ckpt of its --init), or delete the cache")


def to_device(batch, device):
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def rng_state(device):
    return (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def set_rng_state(state, device):
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def train_step(objective, ddp, micro_batches, d, autocast):
    """Forward and backward of one optimiser step over `micro_batches` (gradient cache when > 1).
    Returns the global loss terms (all-reduced, for logging) as {name: float tensor}."""
    model = objective.model
    n = len(micro_batches)
    present = micro_batches[0]["modalities"]
    targets = [model.targets(mb) for mb in micro_batches]
    norms = all_reduce_(sum(count_targets(t, model.cfg.msm_combined) for t in targets))
    touch = model.unused_parameters(present)
    cache = None
    con_terms = {}
    if n > 1 and len(present) > 1:
        # 1. representations without gradients, remembering the RNG state of each micro-batch
        states, reps = [], []
        with torch.no_grad(), autocast():
            for mb in micro_batches:
                states.append(rng_state(d.device))
                reps.append(objective.representations(mb)[0])
        # 2. contrastive loss on the whole local batch (against every rank's columns) and dL/dr
        cat = {m: torch.cat([r[m] for r in reps]).float().requires_grad_(True) for m in reps[0]}
        con = model.logit_scales(cat)
        total = objective.eq3(con)                         # lambda (L_vl + L_vs + L_ls) (+ s_lambda if learned)
        scalars = [model.logit_scales.scale[k] for k in con]
        if model.loss_weights is not None:
            scalars.append(model.loss_weights.s["lam"])
        grads = torch.autograd.grad(total, list(cat.values()) + scalars)
        rep_grads = dict(zip(cat, grads[:len(cat)]))
        scalar_grads = list(zip(scalars, grads[len(cat):]))
        con_terms = {k: v.detach() for k, v in con.items()}
        b = batch_size(micro_batches[0])
    terms_sum = {}
    for i, mb in enumerate(micro_batches):
        if n > 1 and len(present) > 1:
            set_rng_state(states[i], d.device)   # 3. same dropout as in pass 1
            cache = ({m: g[i * b:(i + 1) * b] for m, g in rep_grads.items()}, scalar_grads)
        sync = contextlib.nullcontext() if (i == n - 1 or not hasattr(ddp, "no_sync")) else ddp.no_sync()
        with sync:
            with autocast():
                loss, terms = ddp(mb, targets[i], norms, d.world, cache, touch, n)
            loss.backward()
        for k, v in terms.items():
            terms_sum[k] = terms_sum.get(k, 0) + (v / n if k in PAIR_NAMES.values() else v)
    for p in touch:  # absent modalities: no update at all (AdamW skips parameters without gradient)
        p.grad = None
    terms_sum.update(con_terms)
    names = [k for k in TERMS if k in terms_sum]
    vec = torch.stack([torch.as_tensor(terms_sum[k], device=d.device).float() for k in names])
    all_reduce_(vec)
    contrastive = [i for i, k in enumerate(names) if k in PAIR_NAMES.values()]
    vec[contrastive] /= d.world      # contrastive terms: mean over ranks; masked terms: already global means
    return dict(zip(names, vec))


# ----------------------------------------------------------------------------------------------------
# Checkpoints: safetensors for tensors, JSON for the rest, written atomically.

def unwrap(m):
    m = getattr(m, "module", m)
    m = getattr(m, "_orig_mod", m)
    return getattr(m, "model", m)


def save_weights(model, out_dir):
    """model.safetensors of the unwrapped ICode (tied tensors de-duplicated), written atomically."""
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, ".model.safetensors.tmp")
    save_model(unwrap(model), tmp)
    os.replace(tmp, os.path.join(out_dir, "model.safetensors"))


def optimizer_tensors(opt, model):
    """AdamW state as {f"{param name}::{key}": tensor} (no pickle)."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for p, st in opt.state.items():
        for k, v in st.items():
            out[f"{names[id(p)]}::{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
    return out


def load_optimizer_tensors(opt, model, tensors):
    names = {id(p): n for n, p in model.named_parameters()}
    sd = opt.state_dict()
    idx = 0
    state = {}
    for g in opt.param_groups:
        for p in g["params"]:
            prefix = names[id(p)] + "::"
            st = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if st:
                state[idx] = st
            idx += 1
    sd["state"] = state
    opt.load_state_dict(sd)


def checkpoints(out_dir):
    """Finished checkpoint folders, oldest first (a `.tmp` folder is an interrupted write: ignored)."""
    if not os.path.isdir(out_dir):
        return []
    return sorted(os.path.join(out_dir, f) for f in os.listdir(out_dir)
                  if f.startswith("ckpt_") and not f.endswith(".tmp")
                  and os.path.isfile(os.path.join(out_dir, f, "state.json")))


def save_checkpoint(out_dir, step, model, opt, loader, args, d, keep=3, history=None):
    """Every rank writes its RNG state and its loader's state (position and its own bad-row counters), rank 0
    the rest, into ckpt_XXXXXXX.tmp, then rank 0 renames it."""
    final = os.path.join(out_dir, f"ckpt_{step:07d}")
    tmp = final + ".tmp"
    if d.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    if dist.is_initialized():
        dist.barrier()
    cpu, cuda = rng_state(d.device)
    rng = {"torch_cpu": cpu}
    if cuda is not None:
        rng["torch_cuda"] = cuda
    rng["numpy"] = torch.from_numpy(np.asarray(np.random.get_state()[1], dtype=np.int64))
    save_file(rng, os.path.join(tmp, f"rng_rank{d.rank}.safetensors"),
              metadata={"numpy_pos": str(np.random.get_state()[2]), "python": json.dumps(random.getstate())})
    if loader is not None:
        with open(os.path.join(tmp, f"loader_rank{d.rank}.json"), "w") as f:
            json.dump(loader.state_dict(), f)
    if d.is_main:
        save_model(unwrap(model), os.path.join(tmp, "model.safetensors"))
        save_file(optimizer_tensors(opt, unwrap(model)), os.path.join(tmp, "optimizer.safetensors"))
        state = {"step": step, "config": asdict(unwrap(model).cfg), "args": vars(args), "world": d.world,
                 "history": history or []}
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump(state, f)
    if dist.is_initialized():
        dist.barrier()
    if d.is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)                     # atomic: a reader sees the old set or the new one
        for old in checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return final


def config_differences(a, b, prefix=""):
    """Where two configs (JSON dicts) differ: ["fusion.mode: 'merge' (checkpoint) != 'co' (this run)", ...]."""
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += config_differences(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix}{k}: {x!r} (checkpoint) != {y!r} (this run)")
    return out


def restore_checkpoint(ckpt, model, opt, loader, d):
    """Load weights, optimiser, loader position, this rank's RNG state and normalize_audio (the one setting no
    flag sets) into the model's config. Returns (step, history)."""
    state = read_state(ckpt)
    if state["world"] != d.world:
        raise ValueError(f"{ckpt} was written by {state['world']} processes, this run has {d.world}: "
                         "the data order and RNG streams would not continue exactly")
    # through from_dict: fields added since the checkpoint was written take what it was trained with
    saved = ICodeConfig.from_dict(state["config"])
    # no flag sets normalize_audio: the run goes on with the input it was trained on (raw audio for a checkpoint
    # older than the field, icode.FIELDS_ADDED_LATER); every other setting must be this run's
    unwrap(model).cfg = replace(unwrap(model).cfg, normalize_audio=saved.normalize_audio)
    saved, own = (json.loads(json.dumps(asdict(c))) for c in (saved, unwrap(model).cfg))
    if saved != own:
        diff = "; ".join(config_differences(saved, own)[:5])
        raise ValueError(f"{ckpt} holds a model of other settings ({diff}): --resume with the flags the run started "
                         f"with (--preset, --fusion, the encoders, --video-tokenizer / --speech-tokenizer)")
    load_safetensors_into(unwrap(model), os.path.join(ckpt, "model.safetensors"))
    load_optimizer_tensors(opt, unwrap(model), load_file(os.path.join(ckpt, "optimizer.safetensors")))
    if loader is not None:
        path = os.path.join(ckpt, f"loader_rank{d.rank}.json")
        if os.path.isfile(path):
            with open(path) as f:
                loader.load_state_dict(json.load(f))
        elif state.get("loader") is not None and d.world == 1:   # written before the per-rank files
            loader.load_state_dict(state["loader"])
        else:
            raise FileNotFoundError(f"{path} is missing: --resume continues rank {d.rank}'s data order from it")
    path = os.path.join(ckpt, f"rng_rank{d.rank}.safetensors")
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        rng = {k: f.get_tensor(k) for k in f.keys()}
    set_rng_state((rng["torch_cpu"], rng.get("torch_cuda")), d.device)
    np.random.set_state(("MT19937", rng["numpy"].numpy().astype(np.uint32), int(meta["numpy_pos"])))
    py = json.loads(meta["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    return state["step"], state.get("history", [])


# ----------------------------------------------------------------------------------------------------
# Main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="i-Code pretraining (section 4.2).")
    p.add_argument("--preset", default="tiny", choices=["tiny", "paper"], help="model size (icode.preset)")
    p.add_argument("--fusion", default=None, choices=["merge", "co"],
                   help="fusion attention (section 4.1; default merge, with --init the checkpoint's)")
    p.add_argument("--data", nargs="*", default=None, help="manifests (JSON Lines); default: the toy world")
    p.add_argument("--data-weights", type=float, nargs="*", default=None, help="sampling weight per manifest")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the toy world's)")
    p.add_argument("--toy-dir", default=TOY_DIR, help="where the toy world lives (made if missing)")
    p.add_argument("--out", default=None, help="run folder (checkpoints, metrics.jsonl, loss.png)")
    p.add_argument("--video-tokenizer", default=None,
                   help="MVM targets from a pretrained VQGAN folder (PeCo's family; model.load_quantizer); "
                        "default: a frozen random projection")
    p.add_argument("--speech-tokenizer", default=None,
                   help="MSM targets from a Wav2Vec2ForPreTraining folder's quantizer (the paper's); default: a "
                        "frozen random projection")
    p.add_argument("--init", default=None, help="start from this checkpoint folder's weights (not its state)")
    p.add_argument("--text-encoder", default=None, help="pretrained DeBERTa-V3 folder (model.load_encoder)")
    p.add_argument("--speech-encoder", default=None,
                   help="pretrained WavLM or HuBERT folder (which one, its config.json says)")
    p.add_argument("--vision-encoder", default=None, help="pretrained image Swin folder (inflated to video)")
    p.add_argument("--batch", type=int, default=None,
                   help="micro-batch per device (default: tiny 16; paper 24, i.e. 1728 over 72 GPUs, section 4.2.2)")
    p.add_argument("--accum", type=int, default=1, help="micro-batches per step (gradient cache when > 1)")
    p.add_argument("--global-batch", type=int, default=None, help="check: must equal batch x accum x world")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (default: tiny 500, paper 100000)")
    p.add_argument("--epochs", type=float, default=None,
                   help="instead of --steps: passes over the data (section 4.2.2: 3), converted to steps from the "
                        "sources' sizes and the global batch (steps_for_epochs)")
    p.add_argument("--lr-fusion", type=float, default=None, help="fusion + heads LR (paper 2e-5; tiny 3e-4)")
    p.add_argument("--lr-encoders", type=float, default=None, help="encoders LR (paper 1e-5; tiny 3e-4)")
    p.add_argument("--lr-temperature", type=float, default=None,
                   help="LR of the logit scales ln(tau) and the learned eq. (3) weights (default: paper 5e-4, CLIP's "
                        "base LR; tiny 3e-4, its base LR)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (paper 20000; tiny 50)")
    p.add_argument("--decay", default="cosine", choices=["cosine", "linear"], help="decay after warm-up")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping")
    p.add_argument("--alpha", type=float, default=PAPER_WEIGHTS["alpha"], help="eq. (3) weight of L_MLM")
    p.add_argument("--beta", type=float, default=PAPER_WEIGHTS["beta"], help="eq. (3) weight of L_MVM")
    p.add_argument("--gamma", type=float, default=PAPER_WEIGHTS["gamma"], help="eq. (3) weight of L_MSM")
    p.add_argument("--lam", type=float, default=PAPER_WEIGHTS["lam"], help="eq. (3) weight of the contrastive terms")
    p.add_argument("--loss-weights", default="fixed", choices=["fixed", "learnable"],
                   help="eq. (3)'s weights: fixed (--alpha ... --lam) or learned from the paper's values "
                        "(losses.learned_weights_loss, Kendall et al. 2018)")
    p.add_argument("--contrastive-inputs", default=None, choices=["masked", "unmasked"],
                   help="contrastive branch on the masked encoder outputs (reused, as FLIP; paper default) or on a "
                        "separate unmasked encoder pass (tiny default: from-scratch encoders learn the speech "
                        "pairs only then, README Results)")
    p.add_argument("--bf16", default="auto", choices=["auto", "on", "off"], help="bf16 autocast (auto: on GPU)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the objective (and pad text and audio to their maxima: fixed shapes)")
    p.add_argument("--compile-mode", default="default",
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                   help="torch.compile mode (reduce-overhead: CUDA graphs, for a step that waits on the CPU)")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing of every Transformer block")
    p.add_argument("--seed", type=int, default=0, help="seed (offset by rank)")
    p.add_argument("--workers", type=int, default=None, help="data loader workers per process")
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps")
    p.add_argument("--keep", type=int, default=3, help="checkpoints to keep")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--max-bad-steps", type=int, default=5, help="stop after this many non-finite steps in a row")
    p.add_argument("--log-every", type=int, default=10, help="metrics.jsonl every N steps")
    p.add_argument("--overfit-batch", action="store_true", help="debug: train on the first batch only")
    p.add_argument("--stop-at-step", type=int, default=None,
                   help="act as if preempted at this step: checkpoint and exit (tests exact resume)")
    p.add_argument("--no-eval", action="store_true", help="skip the zero-shot retrieval at the end")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    p.add_argument("--benchmark", action="store_true",
                   help="time the step on synthetic tensors of the --preset's shapes, print JSON (a fresh model; "
                        "the LR stays at its base values)")
    p.add_argument("--bench-steps", type=int, default=10, help="timed steps in --benchmark")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="--benchmark: then profile N more steps, print where the device time goes (JSON)")
    a = p.parse_args(argv)
    if a.keep < 1:
        p.error(f"--keep must be at least 1 (the checkpoint --resume needs), got {a.keep}")
    tiny = a.preset == "tiny"
    if a.steps is not None and a.epochs is not None:
        p.error("give --steps or --epochs, not both")
    if a.epochs is not None and a.epochs <= 0:
        p.error(f"--epochs must be positive, got {a.epochs}")
    if a.epochs is None:
        a.steps = a.steps if a.steps is not None else (500 if tiny else 100000)
    a.batch = a.batch if a.batch is not None else (16 if tiny else 24)
    # tiny: from-scratch encoders; 1e-3 and above collapse the contrastive terms to log(B) (README, Results)
    a.lr_fusion = a.lr_fusion if a.lr_fusion is not None else (3e-4 if tiny else 2e-5)
    a.lr_encoders = a.lr_encoders if a.lr_encoders is not None else (3e-4 if tiny else 1e-5)
    # ln(tau) starts fresh as in CLIP, which trains it at its model's base LR (5e-4 for ViT-B/32, Radford et al.
    # 2021, Table 20); at the fusion's 2e-5 Adam could move it by at most ~2 in 100,000 steps (README)
    a.lr_temperature = a.lr_temperature if a.lr_temperature is not None else (3e-4 if tiny else 5e-4)
    a.warmup = a.warmup if a.warmup is not None else (50 if tiny else 20000)
    a.out = a.out or (TOY_OUT if a.data is None else os.path.join("runs", "pretrain"))
    a.contrastive_inputs = a.contrastive_inputs or ("unmasked" if tiny else "masked")
    if a.benchmark:
        ignored = [f"--{k.replace('_', '-')}" for k in ("init", "text_encoder", "speech_encoder", "vision_encoder",
                                                        "video_tokenizer", "speech_tokenizer", "data", "resume")
                   if getattr(a, k)]
        if ignored:
            p.error(f"--benchmark times a fresh --preset model on synthetic batches that carry their targets: "
                    f"{' '.join(ignored)} would be ignored")
    if a.init:
        a.fusion = check_preset(a.init, a.preset, a.fusion)
    a.fusion = a.fusion or "merge"
    a.unmasked_contrastive = a.contrastive_inputs == "unmasked"
    return a


def build_from_args(args, text_vocab):
    learned = args.loss_weights == "learnable"
    if args.init:
        if args.video_tokenizer or args.speech_tokenizer:
            raise ValueError(f"--init {args.init} brings its own target tokenizers (its weights): drop "
                             f"--video-tokenizer / --speech-tokenizer")
        model = load_model(args.init)
        if model.cfg.learned_loss_weights != learned:   # eq. (3)'s weights from the paper's, the rest from --init
            model.cfg = replace(model.cfg, learned_loss_weights=learned)
            model.loss_weights = LearnedLossWeights() if learned else None
        return model
    fields, toks = pretrained_targets(args.video_tokenizer, args.speech_tokenizer)   # {}, {}: random projections
    fields["learned_loss_weights"] = learned
    if args.text_encoder or args.speech_encoder or args.vision_encoder:
        from model import load_encoder
        if not (args.text_encoder and args.speech_encoder and args.vision_encoder):
            raise ValueError("give all three of --text-encoder, --speech-encoder, --vision-encoder")
        cfg = preset(args.preset, args.fusion)
        from model.wavlm import load_speech_encoder   # WavLM or HuBERT by config.json's model_type
        return ICode.from_encoders(load_encoder("deberta-v3", args.text_encoder),
                                   load_encoder("swin", args.vision_encoder),
                                   load_speech_encoder(args.speech_encoder), fusion=cfg.fusion,
                                   tokenizers=toks, **fields)
    return ICode(replace(preset(args.preset, args.fusion, text_vocab), **fields), tokenizers=toks)


def main(argv=None):
    args = parse_args(argv)
    d = setup_distributed(args.device)
    if args.benchmark:
        return benchmark(args, d)
    seed = args.seed + d.rank
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    autocast = precision(args.bf16, d.device)

    # data: the toy world when none is given
    manifests, tok_path = args.data, args.tokenizer
    dcfg = D.TOY_DATA if args.preset == "tiny" else D.PAPER_DATA
    if args.compile:  # fixed text and audio lengths: one compiled graph per modality set, not one per length
        dcfg = replace(dcfg, pad_to_max=True)
    if not manifests:
        if d.is_main and not os.path.isfile(os.path.join(args.toy_dir, "tokenizer.json")):
            print0(f"making the toy world in {args.toy_dir}/ ...")
            D.make_toy(args.toy_dir)
        if dist.is_initialized():
            dist.barrier()
        manifests = [os.path.join(args.toy_dir, f) for f in TOY_PRETRAIN]
        tok_path = tok_path or os.path.join(args.toy_dir, "tokenizer.json")
    if tok_path is None:
        raise ValueError("--tokenizer is required with --data (a tokenizers tokenizer.json; see README)")
    tokenizer = D.load_tokenizer(tok_path)
    existing = checkpoints(args.out)
    if existing and not args.resume:
        raise ValueError(f"{args.out} already holds checkpoints ({os.path.basename(existing[-1])}): "
                         f"continue with --resume, or give another --out (or remove it)")
    model = build_from_args(args, tokenizer.vocab_size).to(d.device)
    if args.checkpointing:
        enable_checkpointing(model)
    vocab = model.cfg.text.vocab_size
    if tokenizer.vocab_size > vocab:
        raise ValueError(f"tokenizer {tok_path} has {tokenizer.vocab_size} ids, the text encoder {vocab}")
    global_batch = args.batch * args.accum * d.world
    if args.global_batch is not None and args.global_batch != global_batch:
        raise ValueError(f"--global-batch {args.global_batch} != batch {args.batch} x accum {args.accum} "
                         f"x world {d.world} = {global_batch}")
    workers = args.workers if args.workers is not None else min(4, max(0, (os.cpu_count() or 2) // max(1, d.world) - 1))
    log = tqdm_write if d.is_main else None  # data messages above the progress bar
    loader = D.make_loader(manifests, args.data_weights or [1.0] * len(manifests), dcfg, tokenizer,
                           batch_size=args.batch * args.accum, rank=d.rank, world_size=d.world, seed=args.seed,
                           num_workers=workers, log=log)
    if args.epochs is not None:
        args.steps, passes = steps_for_epochs(args.epochs, loader.sampler)
        print0(f"--epochs {args.epochs:g}: {args.steps} steps of global batch {global_batch}; expected passes per "
               f"source: " + ", ".join(f"{k} {v:.2f}" for k, v in passes.items()))
    if args.preset == "paper" and global_batch != PAPER_GLOBAL_BATCH:
        print0(f"note: global batch {global_batch} (batch {args.batch} x accum {args.accum} x world {d.world}); the "
               f"paper's is {PAPER_GLOBAL_BATCH} (section 4.2.2)")
    manifest_of = {ds.name: ds.path for ds in loader.datasets}   # for common_batch's message on a stop
    weights = dict(alpha=args.alpha, beta=args.beta, gamma=args.gamma, lam=args.lam)
    objective = PretrainObjective(model, weights, args.unmasked_contrastive, static_rows(args, dcfg))
    opt = build_optimizer(model, args.lr_fusion, args.lr_encoders, args.weight_decay, lr_scales=args.lr_temperature)
    ddp = wrap_ddp(objective, d)
    if args.compile:
        ddp = compile_step(ddp, args.compile_mode, eager_random=args.accum > 1)   # gradient cache: same dropout
    step, history = 0, []
    if args.resume and existing:
        ckpt = existing[-1]
        step, history = restore_checkpoint(ckpt, model, opt, loader, d)
        print0(f"resumed from {ckpt} at step {step}")
    check_target_caches(loader.datasets, model)   # after the resume's check of the model's settings
    saved_at = step  # the step of the latest checkpoint (0: none)
    if d.is_main:
        os.makedirs(args.out, exist_ok=True)
    stop = {"signal": 0}

    def on_signal(signum, frame):  # Ctrl-C or a preempted job: finish the step, save, exit
        stop["signal"] = signum
    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)   # not the frozen target tokenizers
    print0(f"i-Code {args.preset}/{args.fusion}: {n_params / 1e6:.1f}M trained parameters, world {d.world}, "
           f"global batch {global_batch}, {args.steps} steps, device {d.device}")
    bar = None
    if d.is_main:
        from tqdm import tqdm
        bar = tqdm(total=args.steps, initial=step, dynamic_ncols=True, file=sys.stdout)
    flops_per_sample, bad_in_row = None, 0
    peak = peak_flops(d.device) if d.device.type == "cuda" else None   # one device's bf16 FLOP/s, for MFU
    first_batch = None
    it = iter(loader)
    try:
        while step < args.steps:
            t0 = time.perf_counter()
            rewind = loader.state_dict()  # the loader before this step's batch: where a stop below leaves it
            try:
                batch = first_batch if (args.overfit_batch and first_batch is not None) else next(it)
            except D.TooManyBadExamples as e:  # common_batch stops every rank with this one
                batch = {"stop": str(e)}
            first_batch = first_batch or (batch if args.overfit_batch and not batch.get("empty") else None)
            try:
                batch = common_batch(batch, args.accum, d, manifest_of)
            except D.TooManyBadExamples as e:  # save what was trained, then stop (the data needs fixing)
                loader.load_state_dict(rewind)     # the other ranks took this step's batch already: put it back
                if step > saved_at:
                    save_checkpoint(args.out, step, objective.model, opt, loader, args, d, args.keep, history)
                    where, saved_at = f"Checkpoint saved at step {step}", step
                else:
                    where = f"The latest checkpoint is at step {saved_at}" if step else "No step trained"
                raise D.TooManyBadExamples(f"{e} {where}; repair or replace those rows (same line count), "
                                           f"then --resume") from None
            if batch is None:
                print0(f"step {step}: no rank-wide batch (bad rows beyond the spares), skipped on every rank")
                continue
            objective.check_batch(batch)           # the heads' static selection holds this batch's masks
            batch = to_device(batch, d.device)
            n_step = batch_size(batch) * d.world          # global_batch, unless common_batch shortened it
            t_data = time.perf_counter() - t0
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * lr_factor(step, args.warmup, args.steps, args.decay)
            mbs = split_batch(batch, args.accum)
            # once, for the MFU column; on every rank: the contrastive terms gather across ranks (collectives)
            if flops_per_sample is None and d.device.type == "cuda":
                state = rng_state(d.device)
                flops_per_sample = count_flops(objective, mbs[0], autocast) / batch_size(mbs[0])
                set_rng_state(state, d.device)
                # before the first step: hand the eager pass's blocks back to the GPU for CUDA graphs' own pool
                torch.cuda.empty_cache()
            terms = train_step(objective, ddp, mbs, d, autocast)
            with torch.no_grad():
                total = objective.eq3(terms)
            finite = torch.isfinite(total).item()
            gnorm = grad_norm(model.parameters()) if finite else torch.tensor(float("nan"))
            # A finite loss can still have an inf / NaN gradient (an overflow in the backward): AdamW would write
            # it into every weight. The norm is the same on every rank (DDP averaged the gradients).
            finite = finite and torch.isfinite(gnorm).item()
            if finite:
                clip_and_step(opt, model.parameters(), gnorm, args.clip)
                model.logit_scales.clamp_()       # CLIP: logit scale at most ln(100)
                bad_in_row = 0
            else:
                bad_in_row += 1
                print0(f"step {step}: non-finite loss {total.item()} or gradient norm {float(gnorm)} "
                       f"({ {k: round(v.item(), 4) for k, v in terms.items()} }), step skipped ({bad_in_row} in a row)")
                if bad_in_row >= args.max_bad_steps:
                    raise RuntimeError(f"{bad_in_row} non-finite steps in a row at step {step}; the last good "
                                       f"checkpoint in {args.out} is intact (lower the LR or check the data)")
            opt.zero_grad(set_to_none=True)
            if d.device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            step += 1
            rec = {"step": step, "loss": total.item(), **{k: round(v.item(), 5) for k, v in terms.items()},
                   "grad_norm": round(float(gnorm), 4),
                   **{f"logit_scale_{k}": round(p.exp().item(), 3) for k, p in model.logit_scales.scale.items()},
                   **({f"weight_{w}": round(v.item(), 4) for w, v in model.loss_weights.weights().items()}
                      if model.loss_weights is not None else {}),
                   **{f"lr_{g['name']}": g["lr"] for g in opt.param_groups},
                   **step_rates(n_step, dt, d.world, flops_per_sample, peak),
                   "data_s": round(t_data, 4), "compute_s": round(dt - t_data, 4), "source": batch.get("source")}
            if d.device.type == "cuda":
                rec["peak_mem_GiB"] = round(torch.cuda.max_memory_allocated(d.device) / 2 ** 30, 2)
            history.append({k: rec[k] for k in ("step", "loss", *terms.keys())})
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{v.item():.3f}" for k, v in terms.items()}, refresh=False)
                if step % args.log_every == 0 or step == args.steps:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(rec) + "\n")
            flag = all_reduce_(torch.tensor([float(stop["signal"])], device=d.device), dist.ReduceOp.MAX).item()
            flag = flag or step == args.stop_at_step
            if step % args.save_every == 0 or step == args.steps or flag:
                save_checkpoint(args.out, step, objective.model, opt, loader, args, d, args.keep, history)
                saved_at = step
            if flag:
                why = f"signal {int(flag)}" if step != args.stop_at_step else f"--stop-at-step {step}"
                print0(f"\n{why}: checkpoint saved at step {step}, exiting")
                return {"step": step, "stopped": True, "history": history}
    finally:
        if bar is not None:
            bar.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
        report = loader.bad_report()  # each rank its own rows, on stderr
        if report:
            print(report if d.world == 1 else re.sub("^", f"rank {d.rank}: ", report, flags=re.M), file=sys.stderr)
    if d.is_main:
        plot_history(history, os.path.join(args.out, "loss.png"))
    result = {"step": step, "history": history}
    if not args.no_eval and d.is_main and args.data is None:
        from eval import print_retrieval_table, zero_shot_retrieval
        res = zero_shot_retrieval(model.eval(), os.path.join(args.toy_dir, TOY_HELDOUT), dcfg, tokenizer,
                                  d.device)
        print_retrieval_table(res)
        result["retrieval"] = res
    if dist.is_initialized():
        dist.barrier()
    return result


def step_rates(n_step, dt, world, flops_per_sample=None, peak=None):
    """One step's throughput: n_step samples over all `world` ranks in dt seconds -> global samples/s, per
    device, and (given the FLOPs of one sample's forward + backward and one device's peak FLOP/s) the model
    FLOPs utilisation (PaLM, Chowdhery et al. 2022, app. B): recomputation (the gradient cache's first pass
    with --accum > 1, --checkpointing) is work the GPU does but MFU does not count."""
    out = {"samples_per_s": round(n_step / dt, 2), "samples_per_s_per_device": round(n_step / dt / world, 2)}
    if flops_per_sample and peak:
        out["mfu"] = round(flops_per_sample * n_step / dt / world / peak, 4)
    return out


def transformer_blocks(model):
    """Every Transformer block of the encoders and the fusion network (the units worth checkpointing)."""
    blocks = list(model.text.encoder.layer) + list(model.speech.layers) + list(model.fusion.layers)
    blocks += [blk for stage in model.vision.stages for blk in stage.blocks]
    return blocks


def enable_checkpointing(model):
    """Activation checkpointing: each block keeps only its input and recomputes the rest in backward
    (RNG state preserved by torch.utils.checkpoint, so dropout matches). Parameter names are unchanged."""
    from functools import partial
    from torch.utils.checkpoint import checkpoint
    for blk in transformer_blocks(model):
        blk.forward = partial(checkpoint, type(blk).forward.__get__(blk), use_reentrant=False)


FLOP_PARTS = {"text": ("text",), "speech": ("speech",), "vision": ("vision",), "fusion": ("fusion",),
              "heads": ("mlm_head", "mvm_head", "msm_head")}


def count_flops(objective, mb, autocast, by_part=False):
    """FLOPs of one micro-batch forward + backward, counted once with torch.utils.flop_counter. With
    by_part, also {part: forward FLOPs} for the encoders, the fusion network and the heads (the forward
    only: the counter's attribution of backward operations to modules is not reliable). The heads' padding
    rows under `static_rows` are not counted: the exact selection's work, the same in every mode."""
    from torch.utils.flop_counter import FlopCounterMode
    objective = PretrainObjective(objective.model, objective.weights, objective.unmasked_contrastive)
    model = objective.model
    targets = model.targets(mb)
    norms = count_targets(targets, model.cfg.msm_combined)
    with FlopCounterMode(display=False, depth=2) as fc:
        with autocast():
            loss, _ = objective(mb, targets, norms, 1)
        fwd = {name: sum(c.values()) for name, c in fc.get_flop_counts().items()}
        loss.backward()
    model.zero_grad(set_to_none=True)
    if not by_part:
        return fc.get_total_flops()
    root = type(objective).__name__
    parts = {part: sum(fwd.get(f"{root}.model.{m}", 0) for m in mods) for part, mods in FLOP_PARTS.items()}
    return fc.get_total_flops(), parts


PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}  # dense bf16


def peak_flops(device):
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def plot_history(history, path):
    if not history:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [h["step"] for h in history]
    for k in ("loss",) + TERMS:
        ys = [h.get(k) for h in history]
        if any(y is not None for y in ys):
            ax.plot([s for s, y in zip(steps, ys) if y is not None], [y for y in ys if y is not None], label=k, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend(ncol=4, fontsize=8)
    ax.set_title("i-Code pretraining, eq. (3) and its terms")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------
# --benchmark: this project's real step on synthetic tensors of the paper's shapes (docs/speed.md)

def synthetic_batch(cfg, B, text_len, seconds, frames, res, device, seed=0, data=D.PAPER_DATA):
    """A collated batch of the given shapes with the real masks (30% MLM, tube, span: `data`'s settings) and
    offline-cache style targets, as the off-the-shelf reference step uses (../shared/bench/reference_step.py)."""
    g = torch.Generator().manual_seed(seed)
    V = cfg.text.vocab_size
    ids = torch.randint(5, V, (B, text_len), generator=g)
    special = torch.zeros(B, text_len, dtype=torch.bool)
    inputs, labels = D.mask_tokens(ids, special, 4, V, data.text_mask_ratio, generator=g)
    N = int(seconds * 16000)
    from model.wavlm import conv_output_length
    T_s = conv_output_length(N, cfg.speech.conv_kernel, cfg.speech.conv_stride)
    h = res // 16
    batch = {"modalities": ("video", "text", "audio"), "source": "synthetic",
             "video": torch.randn(B, 3, frames, res, res, generator=g),
             "video_mask": torch.stack([D.tube_mask(frames, h, h, data.tube_ratio, g) for _ in range(B)]),
             "video_targets": torch.randint(0, cfg.video_codebook, (B, frames, h, h), generator=g),
             "text_ids": inputs, "text_ids_clean": ids, "text_labels": labels,
             "text_attention": torch.ones(B, text_len, dtype=torch.bool),
             "audio": torch.randn(B, N, generator=g), "audio_attention": torch.ones(B, N, dtype=torch.bool),
             "audio_mask": D.span_mask_batch([T_s] * B, None, data.span_p, data.span_len, g),
             "audio_targets": torch.randint(0, cfg.speech_vars, (B, T_s, cfg.speech_groups), generator=g)}
    return to_device(batch, device)


def matmul_peak(device):
    """Measured bf16 matrix-multiply rate (8192^3, as the reference measures it)."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192 ** 3 * 10 / (time.perf_counter() - t)


# The benchmark's input shapes per preset: the paper's (the reference step's) and a toy size for the CPU.
BENCH_SHAPES = {"paper": dict(text_len=128, seconds=7.8, frames=8, res=224),
                "tiny": dict(text_len=32, seconds=2.0, frames=4, res=64)}


def benchmark(args, d):
    """Time the real training step (train_step over --accum micro-batches of --batch, clipping, AdamW with the
    run's settings) and print one JSON line with the reference's fields."""
    paper = args.preset == "paper"
    torch.manual_seed(0)
    cuda = d.device.type == "cuda"
    model = load_model(None, args.preset, args.fusion).to(d.device)
    if args.checkpointing:
        enable_checkpointing(model)
    autocast = precision(args.bf16, d.device)
    weights = dict(alpha=args.alpha, beta=args.beta, gamma=args.gamma, lam=args.lam)
    dcfg = D.PAPER_DATA if paper else D.TOY_DATA                # the masking settings of the synthetic batch
    objective = PretrainObjective(model, weights, args.unmasked_contrastive, static_rows(args, dcfg))
    runner = compile_step(objective, args.compile_mode, eager_random=args.accum > 1) if args.compile else objective
    opt = build_optimizer(model, args.lr_fusion, args.lr_encoders, args.weight_decay, lr_scales=args.lr_temperature)
    n = args.batch * args.accum                     # samples a step
    batch = synthetic_batch(model.cfg, n, device=d.device, data=dcfg, **BENCH_SHAPES[args.preset])
    objective.check_batch(batch)
    mbs = split_batch(batch, args.accum)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step():
        terms = train_step(objective, runner, mbs, d, autocast)
        clip_and_step(opt, model.parameters(), grad_norm(model.parameters()), args.clip)
        model.logit_scales.clamp_()
        opt.zero_grad(set_to_none=True)
        return terms

    # one forward + backward over a micro-batch, times --accum: the gradient cache's extra forward of the
    # contrastive representations is not counted (the MFU of train.main counts the same way). Counted eagerly
    # before the compiled step: CUDA graphs keep their own memory pool (38.5 GiB at the paper preset on the
    # H100), and the eager pass on top of it ran out of memory; empty_cache hands the eager pass's blocks back.
    flops, flops_fwd = count_flops(objective, mbs[0], autocast, by_part=True)
    flops, flops_fwd = flops * args.accum, {k: v * args.accum for k, v in flops_fwd.items()}
    parts = encoder_breakdown(model, mbs[0], autocast, sync)   # one micro-batch (the step's batch at --accum 1)
    if cuda:
        torch.cuda.empty_cache()
        # from here: CUDA graphs allocate while recording (warm-up and the next steps), not when replayed
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    step()                                          # warm-up (and compilation)
    sync()
    first_step_s = time.perf_counter() - t          # with --compile: mostly compilation (Inductor's cache helps)
    for _ in range(2):
        step()
    times = []
    for _ in range(args.bench_steps):
        sync()
        t = time.perf_counter()
        terms = step()
        sync()
        times.append(time.perf_counter() - t)
    times.sort()
    med = times[len(times) // 2]
    peak_mem = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None
    peak = matmul_peak(d.device) if cuda else None
    with torch.no_grad():
        total = objective.eq3(terms)
    out = {"impl": "icode-from-scratch", "size": "full" if paper else "tiny", "batch": args.batch,
           "accum": args.accum, "contrastive_inputs": args.contrastive_inputs, "compile": args.compile,
           "compile_mode": args.compile_mode if args.compile else None, "checkpointing": args.checkpointing,
           "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
           "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
           "step_s_median": round(med, 4), "step_s_min": round(times[0], 4), "first_step_s": round(first_step_s, 2),
           "samples_per_s": round(n / med, 2), "tflop_per_step": round(flops / 1e12, 3),
           "tflop_fwd_by_part": {k: round(v / 1e12, 3) for k, v in flops_fwd.items()},
           "achieved_tflops": round(flops / med / 1e12, 1),
           "matmul_peak_tflops": round(peak / 1e12, 1) if peak else None,
           "mfu_vs_matmul_peak": round(flops / med / peak, 3) if peak else None,
           "peak_mem_GiB": round(peak_mem, 1) if peak_mem is not None else None,
           "peak_reserved_GiB": round(torch.cuda.max_memory_reserved() / 2 ** 30, 1) if cuda else None,
           "loss": round(total.item(), 3), "encoder_fwd_bwd_s": parts,
           # graphs Inductor left without CUDA graphs under reduce-overhead (its log says why; a CPU counts all)
           "cudagraph_skips": counters["inductor"]["cudagraph_skips"] if args.compile else None,
           "encoder_fwd_bwd_batch": batch_size(mbs[0])}   # the breakdown's batch: one micro-batch, --batch
    print(json.dumps(out), flush=True)
    if args.profile:
        print(json.dumps({"profile": profile_steps(step, args.profile, cuda, sync)}), flush=True)
    return out


# Kinds of kernels (or CPU ops), by name; the first pattern that matches wins. Inductor names its Triton
# kernels after the ops they fuse (triton_tem_*: matmul templates), cuDNN convolution kernels have "gemm"
# in their names and attention kernels "fmha" or "attention", hence the order.
KERNEL_KINDS = (
    ("matmul", r"^triton_tem"),
    ("fused (inductor)", r"^triton_"),
    ("attention", r"fmha|flash|attention|attn"),
    ("convolution", r"conv|fprop|dgrad|wgrad|cudnn"),
    ("matmul", r"gemm|nvjet|cublas|cutlass|aten::(mm|addmm|bmm|matmul|linear)$"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("copy / layout", r"copy|transpose|permute|contiguous|cat|pad|roll|index|gather|scatter|memcpy|memset|clone"),
    ("normalisation", r"norm"),
)


def kernel_kind(name):
    return next((kind for kind, pat in KERNEL_KINDS if re.search(pat, name, re.IGNORECASE)), "element-wise / other")


def device_work(events, device_type):
    """The profiler's device-side work: kernels, copies and memsets. The device side also holds the spans of
    record_function ranges (Optimizer.step, Inductor's "## Call CompiledFxGraph ..."), which cover other
    kernels and would count them twice: left out."""
    device = [e for e in events if e.device_type == device_type
              and not getattr(e, "is_user_annotation", False) and not e.name.startswith("## ")]
    work = [e for e in device if getattr(e, "activity_type", None) in ("kernel", "gpu_memcpy", "gpu_memset")]
    return work or device      # torch versions without activity_type: the annotation filter alone


def device_time_by_kernel(events, device_type):
    """{kernel name: [microseconds, calls]} over the profiler's device-side work."""
    totals = {}
    for e in device_work(events, device_type):
        acc = totals.setdefault(e.name, [0.0, 0])
        acc[0] += e.time_range.elapsed_us()
        acc[1] += 1
    return totals


# The profiler's own CPU-side spans (CUPTI overhead records), never the region that launched a kernel.
PROFILER_OVERHEAD = ("Buffer Flush", "Command Buffer Full", "Activity Buffer Request", "Instrumentation", "Resource")


def device_idle(events, n, device_type, top=5):
    """Where the device waits, per step: the gaps between consecutive pieces of device work (nothing runs: the
    next kernel was not launched yet, or the CPU was waiting on the device), each filed under the outermost op
    around the CPU op that launched the kernel after it ("Torch-Compiled Region: 0/0": a compiled forward;
    "autograd::engine::evaluate_function: CompiledFunctionBackward": its backward; "Optimizer.step#AdamW.step";
    an eager aten op). Their sum is the part of the step that faster kernels do not shorten. Returns
    {"kernels": per step, "idle_ms": per step, "by_region": {region: [ms, gaps]},
     "largest": [[ms, kernel before, kernel after, region], ...]}."""
    work = sorted(device_work(events, device_type), key=lambda e: e.time_range.start)
    # the CPU ops a kernel can link to (the profiler's own rule: events linked to nothing, e.g. not cudaLaunchKernel)
    cpu = {e.id: e for e in events if e.device_type != device_type and not getattr(e, "linked_correlation_id", 0)}
    gaps, end, last = [], None, None   # end: when all earlier work has ended (kernels may overlap); last: that work
    for e in work:
        if end is not None and e.time_range.start > end:
            gaps.append((e.time_range.start - end, last, e))
        if end is None or e.time_range.end > end:
            end, last = e.time_range.end, e
    by, rows = collections.defaultdict(lambda: [0.0, 0]), []
    for us, a, b in gaps:
        op, outer = cpu.get(getattr(b, "linked_correlation_id", 0)), None
        while op is not None:          # the outermost op that is not the profiler's own (CUPTI's buffer
            if not (getattr(op, "activity_type", None) == "overhead" or op.name in PROFILER_OVERHEAD):
                outer = op             # flushes enclose whole steps: on the H100 every gap was filed there)
            op = op.cpu_parent
        region = outer.name[:60] if outer is not None else "(unknown)"
        by[region][0] += us
        by[region][1] += 1
        rows.append((us, a.name[:60], b.name[:60], region))
    return {"kernels": len(work) // n, "idle_ms": per_step_ms(sum(r[0] for r in rows), n),
            "by_region": {r: [per_step_ms(us, n), k // n] for r, (us, k) in sorted(by.items(), key=lambda kv: -kv[1][0])},
            "largest": [[round(us / 1e3, 3), *rest] for us, *rest in sorted(rows, reverse=True)[:top]]}


# Where the two matrices of an aten matrix product sit among its recorded input shapes (addmm / baddbmm:
# after the added term).
_MATMUL_ARGS = {"aten::mm": 0, "aten::bmm": 0, "aten::addmm": 1, "aten::baddbmm": 1}


def matmul_flop(name, shapes):
    """FLOPs of one call of an aten matrix product ([..., M, K] @ [..., K, N]: 2 * batch * M * K * N) from the
    input shapes the profiler records for it; None for any other op."""
    i = _MATMUL_ARGS.get(name)
    if i is None or len(shapes) < i + 2:
        return None
    a, b = shapes[i], shapes[i + 1]
    if len(a) < 2 or len(b) < 2 or a[-1] != b[-2]:
        return None
    return 2 * math.prod(a[:-2]) * a[-2] * a[-1] * b[-1]


def per_step_ms(us, n):
    """Microseconds summed over n profiled steps -> milliseconds per step."""
    return round(us / n / 1e3, 2)


def op_table(prof, n, cuda, top):
    """The `top` aten ops by (name, input shapes) that ran work themselves (device time on a GPU, CPU self
    time on a CPU), per step: [name, shapes, ms, calls, TFLOP/s for matrix products]. The shapes say which
    encoder an op belongs to (width 1024: speech; 128-1024 in windows of 196: vision; ...). Under
    torch.compile only what Inductor hands to extern kernels (matrix products, convolutions, attention)
    is an aten op; its own Triton kernels are in the kernel list."""
    rows = []
    for e in prof.key_averages(group_by_input_shape=True):
        us = e.self_device_time_total if cuda else e.self_cpu_time_total
        if us > 0 and e.key.startswith("aten::"):   # not the record_function spans around them
            flop = matmul_flop(e.key, e.input_shapes)
            rows.append([e.key, str(e.input_shapes)[:160], per_step_ms(us, n), e.count // n,
                         round(flop * e.count / (us * 1e6), 2) if flop else None])
    return sorted(rows, key=lambda r: -r[2])[:top]


def callers(prof, names, n, cuda, depth=3, per_name=3):
    """Who launched each of `names` (kernels on a GPU, ops on a CPU): {name[:120]: [[chain, ms, calls], ...]}
    per step, the `per_name` chains with the most time. A chain is the launching op and up to `depth` - 1
    of its enclosing ops, innermost first ("aten::sum < aten::convolution_backward < ## Call CompiledFxGraph
    ..."; names cut at 60 characters). On a GPU the launching op is the CPU op the profiler links the kernel
    to; on a CPU the chain starts at the op's parent. It attributes kernels that the kernel list names only
    by their library function (at::native::reduce_kernel: a `sum` from which op?)."""
    wanted, acc = set(names), collections.defaultdict(lambda: collections.defaultdict(lambda: [0.0, 0]))
    for e in prof.events():
        if cuda:
            items = [(k.name, k.duration, e) for k in e.kernels if k.name in wanted]
        else:
            items = [(e.name, e.self_cpu_time_total, e.cpu_parent)] if e.name in wanted else []
        for name, us, launcher in items:
            chain = []
            while launcher is not None and len(chain) < depth:
                chain.append(launcher.name[:60])
                launcher = launcher.cpu_parent
            cell = acc[name][" < ".join(chain) or "(none)"]
            cell[0] += us
            cell[1] += 1
    return {name[:120]: [[chain, per_step_ms(us, n), calls // n] for chain, (us, calls)
                         in sorted(rows.items(), key=lambda kv: -kv[1][0])[:per_name]]
            for name, rows in acc.items()}


def profile_steps(step, n, cuda, sync, top=25):
    """Run `step` n times under torch.profiler. Returns per step: wall time, device-busy time (the sum of
    kernel times; on a CPU the ops' self times), that time by kernel kind, the `top` kernels, the ops that
    launched them (`callers`), the `top` aten ops by input shapes (`op_table`) and, on a GPU, where the
    device idles (`device_idle`, from n more steps profiled without shapes, with their own wall_ms). The
    profiler slows the CPU side, recording shapes more: read wall_ms and idle_ms as upper bounds, busy_share
    as a lower one."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    def profiled(record_shapes):   # n steps under the profiler: (the profile, wall seconds a step)
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []),
                     record_shapes=record_shapes) as p:
            sync()
            t = time.perf_counter()
            for _ in range(n):
                step()
            sync()
        return p, (time.perf_counter() - t) / n

    prof, wall = profiled(record_shapes=True)
    if cuda:   # kernels do not nest: their durations add up to the busy time of the device
        totals = device_time_by_kernel(prof.events(), DeviceType.CUDA)
        quiet, quiet_wall = profiled(record_shapes=False)      # no shapes: less CPU time added
        idle = {"wall_ms": round(quiet_wall * 1e3, 1), **device_idle(quiet.events(), n, DeviceType.CUDA)}
    else:      # CPU ops nest: use self times
        totals = {e.key: [e.self_cpu_time_total, e.count] for e in prof.key_averages() if e.self_cpu_time_total > 0}
        idle = None
    busy = sum(us for us, _ in totals.values())
    kinds = collections.Counter()
    for name, (us, _) in totals.items():
        kinds[kernel_kind(name)] += us
    ms = lambda us: per_step_ms(us, n)
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]
    return {"steps": n, "wall_ms": round(wall * 1e3, 1), "busy_ms": ms(busy),
            "busy_share": round(busy / 1e6 / n / wall, 3),
            "by_kind_ms": {k: ms(v) for k, v in kinds.most_common()},
            "top": [[name[:120], ms(us), calls // n] for name, (us, calls) in ranked],
            "callers": callers(prof, [name for name, _ in ranked], n, cuda),
            "top_ops": op_table(prof, n, cuda, top), "device_idle": idle}


def encoder_breakdown(model, batch, autocast, sync):
    """Forward + backward time of each encoder alone (median of 4 after one warm-up), as the reference,
    and of two parts of "speech": the convolutional feature encoder and the positional convolution (on
    frames of the step's shape; eager, in the benchmark's process before its compiled steps, to set beside
    that convolution's time inside the compiled step and in docs/conv_bench.py's fresh process)."""
    frames = torch.randn(batch_size(batch), batch["audio_mask"].shape[1], model.speech.hidden_size,
                         device=batch["audio"].device, requires_grad=True)
    runs = {"text": lambda: model.text(batch["text_ids"], batch["text_attention"])[0],
            "speech": lambda: model.speech(batch["audio"], batch["audio_attention"])[0],
            "vision": lambda: model.vision(batch["video"])[0],
            "speech_conv_features": lambda: model.speech.feature_extractor(batch["audio"]),
            "speech_pos_conv": lambda: model.speech.pos_conv(frames)}
    out = {}
    for name, fn in runs.items():
        ts = []
        for _ in range(5):
            sync()
            t = time.perf_counter()
            with autocast():
                y = fn()
            y.float().square().mean().backward()
            sync()
            ts.append(time.perf_counter() - t)
        model.zero_grad(set_to_none=True)
        out[name] = round(sorted(ts[1:])[len(ts[1:]) // 2], 4)
    return out


def tqdm_write(msg):
    from tqdm import tqdm
    tqdm.write(msg, file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except D.TooManyBadExamples as e:  # the message names the manifest and the command that lists the rows
        sys.exit(f"train.py: stopped: {e}")
