"""i-Code pretraining (paper section 4.2) with torch DDP, gradient cache and exact resume.

    python train.py                                   # toy world, tiny preset, CPU, a few minutes
    torchrun --nproc_per_node=8 train.py --preset paper --data a.jsonl b.jsonl --batch 24 --accum 1

One step (section 4.2): the encoders run once on the masked inputs; the merged fusion pass feeds the
MLM / MVM / MSM heads (4.2.1); each modality also goes through the fusion network alone and is mean-pooled
for the contrastive losses (4.2.2); eq. (3) combines them. The contrastive batch is the global batch:
negatives come from every GPU (losses.info_nce gathers with gradients) and, with --accum > 1, from every
micro-batch through gradient cache (Gao et al. 2021):
  1. representations of every micro-batch without gradients (RNG state saved per micro-batch);
  2. the contrastive loss on all of them and its gradient with respect to the representations;
  3. each micro-batch again with gradients (RNG restored, so dropout matches), backpropagating the masked
     unit losses plus <representations, cached gradient>; DDP syncs only on the last micro-batch.

The file reads top to bottom: the optimiser and its schedule, the objective (PretrainObjective), the step
(train_step), the arguments, and the main loop. Engineering the paper does not describe lives in training/
(torchrun and DDP, checkpoint folders, compilation, the static shapes CUDA graphs need).
"""
import argparse
import contextlib
import json
import math
import os
import random
import re
import signal
import sys
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import data as D
from evaluation.retrieval import print_retrieval_table, toy_ceiling, zero_shot_retrieval
from icode import ICode, preset, pretrained_targets, target_fingerprint
from losses import PAIR_NAMES, PAPER_WEIGHTS, LearnedLossWeights, count_targets, masked_unit_loss, pretraining_loss
from pipeline.index import load_index
from pipeline.loader import TooManyBadExamples
from pipeline.text import load_tokenizer
from model import load_encoder, vision_kind
from model.wavlm import load_speech_encoder
from pipeline.toy import TOY_DIR, TOY_ENCODERS, TOY_HELDOUT, TOY_OUT, TOY_PRETRAIN, TOY_WEIGHTS, make_toy
from training.checkpoint import (CheckpointError, check_preset, checkpoints, latest_intact, restore_checkpoint,
                                 rng_state, save_checkpoint, set_rng_state)
from training.distributed import all_reduce_, print0, setup_distributed, wrap_ddp
from training.encoders import encoder_folders, pretrain_encoders
from training.speed import (clip_and_step, compile_step, count_flops, enable_checkpointing, peak_flops, precision,
                            step_rates)
from training.static_rows import check_masked_rows, static_rows_config, static_selection

TERMS = ("mlm", "mvm", "msm", "vl", "vs", "ls")


# ----------------------------------------------------------------------------------------------------
# Optimiser and schedule (section 4.2.2: AdamW, 2e-5 fusion / 1e-5 encoders, 20000 warm-up steps)

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


def grad_norm(params):
    """Global L2 norm of the gradients of `params` (those that have one), as clip_grad_norm_ computes it."""
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])


def lr_factor(step, warmup, total, decay="cosine"):
    """Linear warm-up over `warmup` steps (section 4.2.2: 20000), then cosine (or linear) decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * frac)) if decay == "cosine" else 1.0 - frac


PAPER_GLOBAL_BATCH = 1728   # section 4.2.2: "effective batch size 1728" on 72 A100 GPUs


def steps_for_epochs(epochs, sampler):
    """Optimiser steps for `epochs` passes over the data (section 4.2.2: "we pretrain for 3 epochs"). One epoch
    is sum_s E_s steps, E_s = n_s // G, the full global batches in one epoch of source s (the tail dropped):
    every full batch of every source once when the mixing weights are proportional to the E_s. Returns
    (steps, {source: expected passes p_s * steps / E_s})."""
    per_epoch = [n // sampler.global_batch for n in sampler.sizes]
    steps = math.ceil(epochs * sum(per_epoch))
    return steps, {name: float(p * steps / e) if e else 0.0 for name, p, e in zip(sampler.names, sampler.p, per_epoch)}


# ----------------------------------------------------------------------------------------------------
# The objective: one micro-batch's share of eq. (3)

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
        self.static_rows = static_rows   # a DataConfig: the heads select a fixed number of rows (no device sync,
                                         # for CUDA graphs: training/static_rows.py); None: the masked positions

    def check_batch(self, batch):
        """With static_rows, a ValueError if an example has more masked positions than the heads' static
        selection holds (training/static_rows.py; train.main calls it on the host batch, the benchmark on its
        synthetic one); with the exact selection, nothing."""
        if self.static_rows is not None:
            check_masked_rows(self.static_rows, batch)

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
        select = static_selection(self.static_rows, batch) if self.static_rows is not None else None
        logits = self.model.masked_unit_logits(feats, valids, targets, select)
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


# ----------------------------------------------------------------------------------------------------
# Batches: micro-batches, the rank-wide batch, offline targets

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
    is empty ({"empty": True}) when all are (pipeline/loader.py). DDP and the gathered contrastive loss need the same
    batch on every rank, so every rank keeps its first n examples, n = the smallest batch over the ranks
    rounded down to a multiple of accum; with n = 0 every rank skips the step (not one alone, which would
    leave the others waiting in DDP's all-reduce).

    A rank whose loader stopped on too many bad rows brings {"stop": its message} instead of a batch, and the
    same all-reduce carries that (as -1 - rank) to the others: every rank raises TooManyBadExamples
    together, so that train.main saves a checkpoint on all of them rather than one rank exiting alone. The
    others' message names the source the step draws from (all ranks draw from the same one) and, given
    `manifests` ({source name: manifest path}), its manifest."""
    n = -1 - d.rank if "stop" in batch else 0 if batch.get("empty") else batch_size(batch)
    n_all = int(all_reduce_(torch.tensor([n], device=d.device), dist.ReduceOp.MIN).item())
    if n_all < 0:
        src = batch.get("source")
        where = f"{manifests[src]}; " if src in (manifests or {}) else ""
        raise TooManyBadExamples(batch.get("stop") or f"rank {-1 - n_all} stopped on too many bad rows of "
                                                        f"source {src} ({where}that rank's message has the "
                                                        f"counts and reasons).")
    n_all -= n_all % accum
    if n_all == 0:
        return None
    return batch if n_all == n else batch_rows(batch, 0, n_all)


def check_target_caches(datasets, model):
    """Offline VQ targets (`python -m pipeline tokenize`) stand in for the model's own tokenizers (section 4.2.1),
    so they must come from the same ones: a cache whose meta.json fingerprint (`icode.target_fingerprint`)
    differs from the model's, e.g. written with another tokenizer seed or other pretrained tokenizers, or with
    none, is an error naming the cache; otherwise one source's targets would come from another codebook than
    the rest's. (A cache written for another clip shape never gets here: the loader does not use it.)"""
    own = target_fingerprint(model.cfg, model.video_tokenizer, model.speech_tokenizer)
    for ds in datasets:
        meta = ds.targets.meta if ds.targets is not None else {}
        if ds.targets is not None and meta.get("tokenizers") != own:
            raise ValueError(f"{ds.targets.folder}: the target cache was written by tokenizers "
                             f"{meta.get('tokenizers')} ({meta.get('quantizer')}), the model's are {own}: rerun "
                             f"`python -m pipeline tokenize` with the run's --preset, --video-tokenizer and "
                             f"--speech-tokenizer (or --ckpt of its --init), or delete the cache")


# ----------------------------------------------------------------------------------------------------
# The step: forward and backward over the micro-batches, with gradient cache

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
# Arguments and the model they describe

def parse_args(argv=None, extra=None):
    """train.py's arguments, the presets' defaults filled in; extra(parser) adds more (tools/benchmark.py)."""
    p = argparse.ArgumentParser(description="i-Code pretraining (section 4.2).")
    p.add_argument("--preset", default="tiny", choices=["tiny", "paper"], help="model size (icode.preset)")
    p.add_argument("--fusion", default=None, choices=["merge", "co"],
                   help="fusion attention (section 4.1; default merge, with --init the checkpoint's)")
    p.add_argument("--data", nargs="*", default=None, help="manifests (JSON Lines); default: the toy world")
    p.add_argument("--data-weights", type=float, nargs="*", default=None, help="sampling weight per manifest")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the toy world's)")
    p.add_argument("--toy-dir", default=TOY_DIR, help="where the toy world lives (made if missing)")
    p.add_argument("--toy-encoders", default=TOY_ENCODERS,
                   help="the toy world's pretrained single-modality encoders (made by stage one if missing; used "
                        "when the run gives no --data and no encoders)")
    p.add_argument("--encoder-steps", type=int, default=200,
                   help="stage one on the toy world: steps of single-modality masked-unit pretraining (0: no stage "
                        "one, the encoders start fresh)")
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
    p.add_argument("--vision-encoder", default=None,
                   help="pretrained vision folder: an image Swin (inflated to video) or a Video Swin (swin3d), as "
                        "its config.json says")
    p.add_argument("--batch", type=int, default=None,
                   help="micro-batch per device (default: tiny 16; paper 24, i.e. 1728 over 72 GPUs, section 4.2.2)")
    p.add_argument("--accum", type=int, default=1, help="micro-batches per step (gradient cache when > 1)")
    p.add_argument("--global-batch", type=int, default=None, help="check: must equal batch x accum x world")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (default: tiny 600, paper 100000)")
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
    if extra is not None:
        extra(p)
    a = p.parse_args(argv)
    if a.keep < 1:
        p.error(f"--keep must be at least 1 (the checkpoint --resume needs), got {a.keep}")
    tiny = a.preset == "tiny"
    if a.steps is not None and a.epochs is not None:
        p.error("give --steps or --epochs, not both")
    if a.epochs is not None and a.epochs <= 0:
        p.error(f"--epochs must be positive, got {a.epochs}")
    if a.epochs is None:
        a.steps = a.steps if a.steps is not None else (600 if tiny else 100000)
    a.batch = a.batch if a.batch is not None else (16 if tiny else 24)
    # tiny: 3e-4, the toy world's rate (README, Differences from the paper)
    a.lr_fusion = a.lr_fusion if a.lr_fusion is not None else (3e-4 if tiny else 2e-5)
    a.lr_encoders = a.lr_encoders if a.lr_encoders is not None else (3e-4 if tiny else 1e-5)
    # ln(tau) starts fresh as in CLIP, which trains it at its model's base LR (5e-4 for ViT-B/32, Radford et al.
    # 2021, Table 20); at the fusion's 2e-5 Adam could move it by at most ~2 in 100,000 steps (README)
    a.lr_temperature = a.lr_temperature if a.lr_temperature is not None else (3e-4 if tiny else 5e-4)
    a.warmup = a.warmup if a.warmup is not None else (50 if tiny else 20000)
    a.out = a.out or (TOY_OUT if a.data is None else os.path.join("runs", "pretrain"))
    a.contrastive_inputs = a.contrastive_inputs or ("unmasked" if tiny else "masked")
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
        model = ICode.from_checkpoint(args.init).train()
        if model.cfg.learned_loss_weights != learned:   # eq. (3)'s weights from the paper's, the rest from --init
            model.cfg = replace(model.cfg, learned_loss_weights=learned)
            model.loss_weights = LearnedLossWeights() if learned else None
        return model
    fields, toks = pretrained_targets(args.video_tokenizer, args.speech_tokenizer)   # {}, {}: random projections
    fields["learned_loss_weights"] = learned
    cfg = replace(preset(args.preset, args.fusion, text_vocab), **fields)
    if args.text_encoder or args.speech_encoder or args.vision_encoder:
        if not (args.text_encoder and args.speech_encoder and args.vision_encoder):
            raise ValueError("give all three of --text-encoder, --speech-encoder, --vision-encoder")
        return with_encoders(cfg, args.text_encoder, args.vision_encoder, args.speech_encoder, toks)
    return ICode(cfg, tokenizers=toks)


def with_encoders(cfg, text, vision, speech, tokenizers=None):
    """An ICode of `cfg` around pretrained encoders loaded from their folders (section 4.1), the way a real run
    loads the public checkpoints: `model.load_encoder` (the vision kind and WavLM vs HuBERT as their config.json
    say). The encoders' architectures replace cfg's."""
    t = load_encoder("deberta-v3", text)
    v = load_encoder(vision_kind(vision), vision)
    s = load_speech_encoder(speech)
    cfg = replace(cfg, text=t.config, vision=v.config, speech=s.config)
    return ICode(cfg, text=t, vision=v, speech=s, tokenizers=tokenizers).train()


# ----------------------------------------------------------------------------------------------------
# The run: set-up, the main loop and its three helpers, the end

@dataclass
class Run:
    """Everything one pretraining run holds between steps."""
    args: argparse.Namespace
    d: object                 # training.distributed.Dist: rank, world size, device
    dcfg: D.DataConfig        # clip shape and masking settings
    tokenizer: object
    model: ICode
    loader: object            # data.make_loader's loader
    objective: PretrainObjective
    ddp: nn.Module            # the objective, DDP-wrapped and compiled as asked
    opt: torch.optim.Optimizer
    autocast: object          # a factory of the autocast context (training.speed.precision)
    step: int = 0             # optimiser steps done
    saved_at: int = 0         # the step of the latest checkpoint (0: none)
    history: list = None      # [{"step", "loss", term: value}] for state.json and loss.png
    bad_in_row: int = 0       # non-finite steps in a row
    flops_per_sample: float = None

    def save(self):
        save_checkpoint(self.args.out, self.step, self.model, self.opt, self.loader, self.args, self.d, self.args.keep,
                        self.history)
        self.saved_at = self.step


def pretraining_data(args, d):
    """(manifests, tokenizer.json, DataConfig): the run's, or the toy world's (made here when missing)."""
    dcfg = D.TOY_DATA if args.preset == "tiny" else D.PAPER_DATA
    if args.compile:  # fixed text and audio lengths: one compiled graph per modality set, not one per length
        dcfg = replace(dcfg, pad_to_max=True)
    if args.data:
        if args.tokenizer is None:
            raise ValueError("--tokenizer is required with --data (a tokenizers tokenizer.json; see README)")
        manifests, tok_path = args.data, args.tokenizer
    else:
        if d.is_main and not os.path.isfile(os.path.join(args.toy_dir, "tokenizer.json")):
            print0(f"making the toy world in {args.toy_dir}/ ...")
            make_toy(args.toy_dir)
        manifests = [os.path.join(args.toy_dir, f) for f in TOY_PRETRAIN]
        args.data_weights = args.data_weights or list(TOY_WEIGHTS)
        tok_path = args.tokenizer or os.path.join(args.toy_dir, "tokenizer.json")
    if d.is_main:                     # the manifests' line indexes, once, before every rank maps them
        for m in manifests:
            load_index(m)
    if dist.is_initialized():
        dist.barrier()
    return manifests, tok_path, dcfg


def toy_encoders(args, d, manifests, tokenizer, dcfg):
    """The toy world's run starts, like the paper's, from pretrained single-modality encoders: the folders of
    `--toy-encoders`, made once by stage one (training/encoders.py) when missing, on rank 0 while the others
    wait; they become the run's --text-encoder, --vision-encoder and --speech-encoder."""
    folders = encoder_folders(args.toy_encoders)
    if d.is_main and not all(os.path.isfile(os.path.join(f, "model.safetensors")) for f in folders.values()):
        print0(f"stage one: pretraining the toy encoders, each on its own modality, into {args.toy_encoders}/ ...")
        pretrain_encoders(preset(args.preset, "merge", tokenizer.vocab_size), manifests, tokenizer, dcfg,
                          args.toy_encoders, args.encoder_steps, batch=args.batch, seed=args.seed, log=print0)
    if dist.is_initialized():
        dist.barrier()
    args.text_encoder, args.vision_encoder, args.speech_encoder = folders["text"], folders["vision"], folders["speech"]


def setup(args, d):
    """Seeds, data, model, loader, objective and optimiser of a run; with --resume, its latest checkpoint."""
    seed = args.seed + d.rank
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    manifests, tok_path, dcfg = pretraining_data(args, d)
    tokenizer = load_tokenizer(tok_path)
    if args.encoder_steps and not (args.data or args.init or args.text_encoder or args.speech_encoder
                                   or args.vision_encoder):
        toy_encoders(args, d, manifests, tokenizer, dcfg)
    existing = checkpoints(args.out)
    if existing and not args.resume:
        raise ValueError(f"{args.out} already holds checkpoints ({os.path.basename(existing[-1])}): "
                         f"continue with --resume, or give another --out (or remove it)")
    model = build_from_args(args, tokenizer.vocab_size).to(d.device)
    if args.checkpointing:
        enable_checkpointing(model)
    if tokenizer.vocab_size > model.cfg.text.vocab_size:
        raise ValueError(f"tokenizer {tok_path} has {tokenizer.vocab_size} ids, the text encoder "
                         f"{model.cfg.text.vocab_size}")
    global_batch = args.batch * args.accum * d.world
    if args.global_batch is not None and args.global_batch != global_batch:
        raise ValueError(f"--global-batch {args.global_batch} != batch {args.batch} x accum {args.accum} "
                         f"x world {d.world} = {global_batch}")
    workers = args.workers if args.workers is not None else min(4, max(0, (os.cpu_count() or 2) // max(1, d.world) - 1))
    loader = D.make_loader(manifests, args.data_weights or [1.0] * len(manifests), dcfg, tokenizer,
                           batch_size=args.batch * args.accum, rank=d.rank, world_size=d.world, seed=args.seed,
                           num_workers=workers, log=tqdm_write if d.is_main else None)
    if args.epochs is not None:
        args.steps, passes = steps_for_epochs(args.epochs, loader.sampler)
        print0(f"--epochs {args.epochs:g}: {args.steps} steps of global batch {global_batch}; expected passes per "
               f"source: " + ", ".join(f"{k} {v:.2f}" for k, v in passes.items()))
    if args.preset == "paper" and global_batch != PAPER_GLOBAL_BATCH:
        print0(f"note: global batch {global_batch} (batch {args.batch} x accum {args.accum} x world {d.world}); the "
               f"paper's is {PAPER_GLOBAL_BATCH} (section 4.2.2)")
    weights = dict(alpha=args.alpha, beta=args.beta, gamma=args.gamma, lam=args.lam)
    objective = PretrainObjective(model, weights, args.unmasked_contrastive, static_rows_config(args, dcfg))
    opt = build_optimizer(model, args.lr_fusion, args.lr_encoders, args.weight_decay, lr_scales=args.lr_temperature)
    ddp = wrap_ddp(objective, d)
    if args.compile:
        ddp = compile_step(ddp, args.compile_mode, eager_random=args.accum > 1)   # gradient cache: same dropout
    run = Run(args, d, dcfg, tokenizer, model, loader, objective, ddp, opt, precision(args.bf16, d.device), history=[])
    ckpt = latest_intact(args.out, d, log=print0) if args.resume and existing else None
    if ckpt is not None:
        run.step, run.history = restore_checkpoint(ckpt, model, opt, loader, d, global_batch, args.seed, print0)
        run.saved_at = run.step
        print0(f"resumed from {ckpt} at step {run.step}")
    check_target_caches(loader.datasets, model)   # after the resume's check of the model's settings
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)   # not the frozen target tokenizers
    print0(f"i-Code {args.preset}/{args.fusion}: {n_params / 1e6:.1f}M trained parameters, world {d.world}, "
           f"global batch {global_batch}, {args.steps} steps, device {d.device}")
    return run


def next_batch(run, it, first=None):
    """This step's batch, the part every rank can train on (`common_batch`), or None: skip the step on every
    rank. Too many bad rows on some rank stop every rank: the last step trained is saved first and the loader
    put back before this step's batch, so that `--resume` after a repair goes on from there. `first`: the batch
    to repeat (--overfit-batch)."""
    rewind = run.loader.state_dict()
    try:
        batch = first if first is not None else next(it)
    except TooManyBadExamples as e:   # common_batch stops every rank with this one
        batch = {"stop": str(e)}
    try:
        batch = common_batch(batch, run.args.accum, run.d, {ds.name: ds.path for ds in run.loader.datasets})
    except TooManyBadExamples as e:   # save what was trained, then stop (the data needs fixing)
        run.loader.load_state_dict(rewind)    # the other ranks took this step's batch already: put it back
        if run.step > run.saved_at:
            run.save()
            where = f"Checkpoint saved at step {run.step}"
        else:
            where = f"The latest checkpoint is at step {run.saved_at}" if run.step else "No step trained"
        raise TooManyBadExamples(f"{e} {where}; repair or replace those rows (same line count), then --resume") from None
    if batch is None:
        print0(f"step {run.step}: no rank-wide batch (bad rows beyond the spares), skipped on every rank")
    return batch


def optimizer_step(run, terms):
    """Eq. (3)'s total over the step's terms, then AdamW on the gradients clipped at --clip, and CLIP's clamp of
    the logit scales. A non-finite loss or gradient norm skips the update (a finite loss can still overflow in
    the backward, and AdamW would write that into every weight); --max-bad-steps of them in a row stop the
    run. Returns (total, gradient norm)."""
    with torch.no_grad():
        total = run.objective.eq3(terms)
    finite = torch.isfinite(total).item()
    gnorm = grad_norm(run.model.parameters()) if finite else torch.tensor(float("nan"))
    if finite and torch.isfinite(gnorm).item():   # the same on every rank: DDP averaged the gradients
        clip_and_step(run.opt, run.model.parameters(), gnorm, run.args.clip)
        run.model.logit_scales.clamp_()           # CLIP: logit scale at most ln(100)
        run.bad_in_row = 0
    else:
        run.bad_in_row += 1
        print0(f"step {run.step}: non-finite loss {total.item()} or gradient norm {float(gnorm)} "
               f"({ {k: round(v.item(), 4) for k, v in terms.items()} }), step skipped ({run.bad_in_row} in a row)")
        if run.bad_in_row >= run.args.max_bad_steps:
            raise RuntimeError(f"{run.bad_in_row} non-finite steps in a row at step {run.step}; the last good "
                               f"checkpoint in {run.args.out} is intact (lower the LR or check the data)")
    run.opt.zero_grad(set_to_none=True)
    return total, gnorm


def step_record(run, terms, total, gnorm, n_step, t_data, dt, source):
    """The metrics.jsonl line of a step: eq. (3)'s total and terms, the gradient norm, the temperatures (and
    learned eq. (3) weights), the learning rates, throughput and data time."""
    model, d = run.model, run.d
    rec = {"step": run.step, "loss": total.item(), **{k: round(v.item(), 5) for k, v in terms.items()},
           "grad_norm": round(float(gnorm), 4),
           **{f"logit_scale_{k}": round(p.exp().item(), 3) for k, p in model.logit_scales.scale.items()},
           **({f"weight_{w}": round(v.item(), 4) for w, v in model.loss_weights.weights().items()}
              if model.loss_weights is not None else {}),
           **{f"lr_{g['name']}": g["lr"] for g in run.opt.param_groups},
           **step_rates(n_step, dt, d.world, run.flops_per_sample, peak_flops(d.device) if d.device.type == "cuda" else None),
           "data_s": round(t_data, 4), "compute_s": round(dt - t_data, 4), "source": source}
    if d.device.type == "cuda":
        rec["peak_mem_GiB"] = round(torch.cuda.max_memory_allocated(d.device) / 2 ** 30, 2)
    return rec


def count_flops_once(run, mb):
    """FLOPs per sample of the step, once, for the MFU column (GPUs only). On every rank: the contrastive terms
    gather across ranks. The RNG state is put back, so the run draws what it would have drawn without it."""
    if run.flops_per_sample is not None or run.d.device.type != "cuda":
        return
    state = rng_state(run.d.device)
    run.flops_per_sample = count_flops(run.objective, mb, run.autocast) / batch_size(mb)
    set_rng_state(state, run.d.device)
    torch.cuda.empty_cache()   # the eager pass's blocks back to the GPU, for CUDA graphs' own pool


def main(argv=None):
    args = parse_args(argv)
    d = setup_distributed(args.device)
    run = setup(args, d)
    stop = {"signal": 0}

    def on_signal(signum, frame):  # Ctrl-C or a preempted job: finish the step, save, exit
        stop["signal"] = signum
    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    if d.is_main:
        os.makedirs(args.out, exist_ok=True)
        from tqdm import tqdm
    bar = tqdm(total=args.steps, initial=run.step, dynamic_ncols=True, file=sys.stdout) if d.is_main else None
    it, first = iter(run.loader), None
    try:
        while run.step < args.steps:
            t0 = time.perf_counter()
            batch = next_batch(run, it, first)
            if batch is None:
                continue
            first = batch if args.overfit_batch else None
            run.objective.check_batch(batch)           # the heads' static selection holds this batch's masks
            batch = D.to_device(batch, d.device)
            t_data = time.perf_counter() - t0
            for g in run.opt.param_groups:
                g["lr"] = g["base_lr"] * lr_factor(run.step, args.warmup, args.steps, args.decay)
            mbs = split_batch(batch, args.accum)
            count_flops_once(run, mbs[0])
            terms = train_step(run.objective, run.ddp, mbs, d, run.autocast)      # forward and backward
            total, gnorm = optimizer_step(run, terms)                             # AdamW
            if d.device.type == "cuda":
                torch.cuda.synchronize()
            run.step += 1
            rec = step_record(run, terms, total, gnorm, batch_size(batch) * d.world, t_data,
                              time.perf_counter() - t0, batch.get("source"))
            run.history.append({k: rec[k] for k in ("step", "loss", *terms.keys())})
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{v.item():.3f}" for k, v in terms.items()}, refresh=False)
                if run.step % args.log_every == 0 or run.step == args.steps:
                    with open(os.path.join(args.out, "metrics.jsonl"), "a") as f:
                        f.write(json.dumps(rec) + "\n")
            flag = all_reduce_(torch.tensor([float(stop["signal"])], device=d.device), dist.ReduceOp.MAX).item()
            flag = flag or run.step == args.stop_at_step
            if run.step % args.save_every == 0 or run.step == args.steps or flag:
                run.save()
            if flag:
                why = f"signal {int(flag)}" if run.step != args.stop_at_step else f"--stop-at-step {run.step}"
                print0(f"\n{why}: checkpoint saved at step {run.step}, exiting")
                return {"step": run.step, "stopped": True, "history": run.history}
    finally:
        if bar is not None:
            bar.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
        report = run.loader.bad_report()  # each rank its own rows, on stderr
        if report:
            print(report if d.world == 1 else re.sub("^", f"rank {d.rank}: ", report, flags=re.M), file=sys.stderr)
    return finish(run)


def finish(run):
    """loss.png, and on the toy world the zero-shot retrieval table of the held-out clips."""
    args, d = run.args, run.d
    result = {"step": run.step, "history": run.history}
    if d.is_main:
        plot_history(run.history, os.path.join(args.out, "loss.png"))
    if not args.no_eval and d.is_main and args.data is None:
        held = os.path.join(args.toy_dir, TOY_HELDOUT)
        res = zero_shot_retrieval(run.model.eval(), held, run.dcfg, run.tokenizer, d.device)
        print_retrieval_table(res, limit=toy_ceiling(held))
        result["retrieval"] = res
    if dist.is_initialized():
        dist.barrier()
    return result


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


def tqdm_write(msg):
    from tqdm import tqdm
    tqdm.write(msg, file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except (TooManyBadExamples, CheckpointError) as e:  # the message names the file and what to do
        sys.exit(f"train.py: stopped: {e}")
