"""Downstream evaluation of i-Code (Yang et al. 2022, sections 5-6, appendix A.2): the paper's metrics,
fine-tuning of a pretrained checkpoint on labelled manifests, zero-shot retrieval, and the paper's
tables in miniature on the toy world.

    python eval.py                          # the toy world's Tables 1-2 and 8: runs/eval/report.md + report.png
    python eval.py --task sentiment --train tr.jsonl --val va.jsonl --test te.jsonl --ckpt runs/x --seeds 5
    python eval.py --task emotion ... --modalities L,S       # any subset of V, L, S (section 6's ablation)
    python eval.py --task glue --glue-task CoLA --glue-dir glue_data/CoLA --ckpt runs/x
    python eval.py --task retrieval --test te.jsonl --ckpt runs/x          # zero-shot, no fine-tuning

Tasks (`--task`) and what the paper reports for them:

    sentiment  CMU-MOSEI regression in [-3, 3] (Tables 1, 9): MAE, Corr, Acc-2 and F1 in both conventions, Acc-7
    emotion    CMU-MOSEI multi-label, six Ekman classes (Tables 2, 8, 10): Acc (Jaccard), micro-F1, P, R
    binary     UR-FUNNY humour (Table 3); VIOLIN entailment (Table 4, hypothesis [SEP] subtitles): accuracy
    mc         How2QA, KnowIT multiple choice (Tables 5, 6): question [SEP] answer [SEP] subtitles per candidate
    glue       GLUE (Table 7), text only, from GLUE's TSV files: the standard metric per task
    retrieval  R@1/5/10 both directions per modality pair from the contrastive space (no fine-tuning)

The file reads top to bottom: the task heads and losses, batches for each task, the fine-tuning loop (early
stopping on the validation split, best-checkpoint selection, mean +- std over seeds as appendix A.2), the
command line, and the toy world's report. The metrics, zero-shot retrieval, the GLUE reader, the report's
rows and its write-up are in evaluation/.

Choices where the paper is silent (and differences from it):
  - The multimodal representation averages each modality's fused tokens over its valid positions, then
    averages the modalities with equal weight (`joint_representation`), whatever their lengths.
  - Sentiment F1 is the support-weighted F1 of MulT / MISA / Self-MM's code; emotion "Acc." is the Jaccard
    (example-based) multi-label accuracy of the emotion baselines; see the metric docstrings for each 0/0.
  - Model selection: best validation MAE (sentiment), micro-F1 (emotion), accuracy (binary, mc), the first
    GLUE metric; early stopping after --patience epochs without improvement; constant learning rates.
  - The tiny preset freezes the encoders by default (--lr-encoders 0) and caches their outputs so that the
    toy report runs in minutes on a CPU; the paper fine-tunes the whole model (--lr-encoders > 0 does).
  - GLUE is evaluated on the dev sets (test labels are hidden), selected on dev.
  - Retrieval ranks count ties against the positive (pessimistic).
  - The report's rows (section 5.1): D+V+M is `python train.py`'s run; D+M, D+C and V+M are pretrained here once,
    with that run's recipe and stage-one encoders, on their own sources; NP+M is those encoders under a fresh
    fusion. Table 8 uses D+M, as the paper's does. Each cell is the mean +- std over 3 seeds (the paper: 5).
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data as D
from evaluation.glue import GLUE_SPECS, load_glue
from evaluation.metrics import GLUE_METRICS, accuracy, glue_metrics, multilabel_metrics, regression_metrics
from evaluation.report import fmt, plot_report, report_markdown
from evaluation.retrieval import print_retrieval_table, toy_ceiling, zero_shot_retrieval
from evaluation.rows import MAIN_ROW, ROWS, SUBSET_ROW, SUBSET_TASKS, SUBSETS, pretrain_rows
from icode import ICode, preset
from model.fusion import MODALITIES, joint_representation
from pipeline.manifest import load_examples
from pipeline.text import load_tokenizer
from pipeline.toy import TOY_DIR, TOY_HELDOUT, TOY_OUT, make_toy
from train import build_optimizer, with_encoders
from training.checkpoint import check_preset, checkpoints, read_state, resolve_ckpt, save_weights
from training.distributed import setup_distributed, wrap_ddp
from training.encoders import encoder_folders

# ----------------------------------------------------------------------------------------------------
# Tasks, the multimodal representation and the heads (sections 5.1-5.4)

MOD_LETTERS = {"V": "video", "L": "text", "S": "audio"}   # the paper's V, L, S -> the project's modality names


TASKS = ("sentiment", "emotion", "binary", "mc", "glue")


# metric used to pick the best epoch on the validation split, and whether lower is better
SELECT = {"sentiment": ("mae", True), "emotion": ("f1", False), "binary": ("acc", False), "mc": ("acc", False)}


def selection_metric(task, glue_task=None):
    """(metric, lower is better) that picks the best epoch on the validation split: SELECT; for GLUE the
    task's first metric (GLUE_METRICS: F1 for MRPC and QQP, Pearson for STS-B)."""
    return SELECT.get(task, (GLUE_METRICS.get(glue_task, ("acc",))[0], False))


def parse_modalities(s):
    """'V,L,S' (any non-empty subset, any order; names 'video,text,audio' work too) -> modality names in
    MODALITIES order."""
    names = {MOD_LETTERS.get(x.strip().upper(), x.strip().lower()) for x in s.split(",") if x.strip()}
    if not names or names - set(MODALITIES):
        raise ValueError(f"--modalities takes a non-empty subset of V,L,S, got {s!r}")
    return tuple(m for m in MODALITIES if m in names)


def modality_letters(mods):
    return "+".join(k for k, v in MOD_LETTERS.items() if v in mods)


class TaskHead(nn.Module):
    """Dropout + Linear on the joint representation [B, D] -> [B, n_out] (a projection to logits, section 5)."""

    def __init__(self, dim, n_out, dropout=0.1):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.proj = nn.Linear(dim, n_out)

    def forward(self, x):
        return self.proj(self.drop(x))


def head_outputs(task, glue_task=None):
    """Output width of the head: sentiment 1 (a score), emotion 6 (one logit per class), binary 2,
    mc 1 (a logit per candidate), glue: classes (1 for STS-B's similarity score)."""
    if task == "glue":
        return GLUE_SPECS[glue_task][3]
    return {"sentiment": 1, "emotion": 6, "binary": 2, "mc": 1}[task]


class FineTuner(nn.Module):
    """i-Code + a TaskHead on the joint representation, over a fixed subset of modalities.

    forward(inputs=None, feats=None, valids=None, n_candidates=1) -> logits
      inputs: raw model inputs {video [B, 3, T, H, W], text [B*K, T_l], text_attention, audio [B, N],
              audio_attention}, or feats/valids: the encoders' outputs already computed (`encode`), which is
              how frozen encoders are run once and cached.
      returns [B, n_out]; for multiple choice [B, K]: one logit per (question, candidate) pair, and
      `loss_fn` / `predict` apply the softmax over dim 1, i.e. over the candidates of one question only.
    The attribute is `icode`, not `model`: train.unwrap would otherwise strip the head when saving.
    """

    def __init__(self, icode, task, n_out, modalities):
        super().__init__()
        self.icode, self.task, self.modalities = icode, task, tuple(modalities)
        self.head = TaskHead(icode.cfg.fusion.dim, n_out)

    def encode(self, inputs):
        """Encoders only. For multiple choice the text holds B*K rows (question [SEP] candidate [SEP] subtitles)
        while video and audio hold B rows: each is encoded once, then repeated K times (the encoders are
        per-modality, so this equals encoding the repeated inputs)."""
        m = self.modalities
        feats, valids = self.icode.encode_modalities(
            video=inputs.get("video") if "video" in m else None, text=inputs.get("text") if "text" in m else None,
            audio=inputs.get("audio") if "audio" in m else None,
            text_attention=inputs.get("text_attention"), audio_attention=inputs.get("audio_attention"))
        return feats, valids

    def forward(self, inputs=None, feats=None, valids=None, n_candidates=1):
        if feats is None:
            feats, valids = self.encode(inputs)
        rows = max(x.shape[0] for x in feats.values())                   # B*K
        feats, valids = dict(feats), dict(valids)
        for m in feats:                                                   # repeat per-clip modalities K times
            if feats[m].shape[0] != rows:
                feats[m] = feats[m].repeat_interleave(rows // feats[m].shape[0], dim=0)
                if valids[m] is not None:
                    valids[m] = valids[m].repeat_interleave(rows // valids[m].shape[0], dim=0)
        tokens = self.icode.fusion(feats, valids)
        logits = self.head(joint_representation(tokens, valids))          # [B*K, n_out]
        if self.task == "mc":
            return logits.view(-1, n_candidates)                          # [B, K]
        return logits


def loss_fn(task, logits, target):
    """sentiment: L1 (MAE, as MulT / MISA / Self-MM train on MOSEI); emotion: BCE-with-logits per class;
    binary: 2-way cross-entropy; mc: cross-entropy over the K candidates of each question (softmax over
    dim 1 of [B, K]); glue: cross-entropy, or MSE for STS-B's score (one output)."""
    if task == "sentiment":
        return F.l1_loss(logits.squeeze(-1), target)
    if task == "emotion":
        return F.binary_cross_entropy_with_logits(logits, target)
    if logits.shape[-1] == 1 and target.is_floating_point():             # STS-B
        return F.mse_loss(logits.squeeze(-1), target)
    return F.cross_entropy(logits, target)


def predict(task, logits):
    """Logits -> what the metrics take: a score, 0/1 per emotion (sigmoid > 0.5, i.e. logit > 0), a class id,
    or the candidate with the highest softmax probability (argmax: an exact tie goes to the first candidate,
    so a collapsed model scores the share of answers in position 0)."""
    if task == "sentiment" or logits.shape[-1] == 1 and task == "glue":
        return logits.squeeze(-1)
    if task == "emotion":
        return (logits > 0).float()
    return logits.argmax(-1)


def task_metrics(task, pred, target, glue_task=None):
    pred, target = pred.cpu().numpy(), target.cpu().numpy()
    if task == "sentiment":
        return regression_metrics(pred, target)
    if task == "emotion":
        return multilabel_metrics(pred, target)
    if task == "glue":
        return glue_metrics(glue_task, pred, target)
    return {"acc": accuracy(pred, target)}


# ----------------------------------------------------------------------------------------------------
# Examples -> model inputs

def join_segments(tokenizer, segments, max_len):
    """[CLS] s_1 [SEP] s_2 [SEP] ... s_n [SEP] as ids (sections 5.2-5.3: hypothesis / question, candidate and
    subtitles joined by [SEP]). Past max_len the *last* segment (the subtitles) gets only the room the others
    leave; when the others alone do not fit, the longest of them loses tokens first (the "longest first" rule
    of BERT's pair truncation), so a long question never removes the candidate answer."""
    pieces = [tokenizer.tokenizer.encode(s, add_special_tokens=False).ids for s in segments]
    budget = max_len - 1 - len(pieces)                          # [CLS] and one [SEP] per segment
    if budget < 0:
        raise ValueError(f"max_len {max_len} cannot hold [CLS] and {len(pieces)} [SEP]")
    keep = [len(p) for p in pieces[:-1]]
    while sum(keep) > budget:
        keep[keep.index(max(keep))] -= 1
    keep.append(budget - sum(keep))
    ids = [tokenizer.cls_id]
    for p, n in zip(pieces, keep):
        ids += p[:n] + [tokenizer.sep_id]
    return ids


def text_sequences(ex, task, tokenizer, max_len):
    """The text rows of one example: one sequence, or K for multiple choice (question [SEP] answer_k [SEP]
    subtitles, section 5.3). Other tasks use the data module's ids: [CLS] caption [SEP] text [SEP], which for
    VIOLIN (caption = hypothesis, text = subtitles) is the paper's "hypothesis [SEP] subtitles" (5.2)."""
    if task == "mc":
        return [join_segments(tokenizer, [ex["question"], a, ex["text"]], max_len) for a in ex["answers"]]
    return [ex["text_ids"]]


def target_of(examples, task):
    if task == "sentiment":
        return torch.tensor([float(e["score"]) for e in examples])
    if task == "emotion":
        bad = sorted({x for e in examples for x in e["emotions"]} - {0, 1})
        if bad:  # CMU-MOSEI's raw intensities (0, 0.33, ..., 3) are not presence labels: binarise them first
            raise ValueError(f"emotion labels must be 0 or 1 per class, got {bad[:5]}; for CMU-MOSEI's raw "
                             f"intensities write 1 where the intensity is > 0 (the usual presence label)")
        return torch.tensor([[float(x) for x in e["emotions"]] for e in examples])
    if task == "binary":
        vals = [e["label"] for e in examples]
        if any(v not in (0, 1) for v in vals):  # 1.0 is a class (exported tables write floats); 0.5 is not
            raise ValueError(f"binary labels must be 0 or 1, got {sorted(set(vals) - {0, 1})}")
        return torch.tensor([int(v) for v in vals])
    if task == "mc":
        return torch.tensor([int(e["answer"]) for e in examples])
    vals = [e["label"] for e in examples]  # GLUE: the reader gives ints, floats for STS-B's regression
    return torch.tensor(vals, dtype=torch.float if isinstance(vals[0], float) else torch.long)


def make_inputs(examples, task, modalities, dcfg, tokenizer):
    """Raw examples (ManifestDataset items, or GLUE's {"text_ids", "label"}) -> (inputs, target, K)."""
    inputs = {}
    if "video" in modalities or "audio" in modalities:
        b = D.collate([{k: v for k, v in e.items() if k != "text_ids"} for e in examples], dcfg, None)
        inputs.update({k: b[k] for k in ("video", "audio", "audio_attention") if k in b})
    K = 1
    if "text" in modalities:
        seqs = [text_sequences(e, task, tokenizer, dcfg.max_text_len) for e in examples]
        K = len(seqs[0])
        if any(len(s) != K for s in seqs):
            raise ValueError(f"every question needs the same number of candidates, "
                             f"got {sorted({len(s) for s in seqs})}")
        inputs["text"], inputs["text_attention"] = tokenizer.pad([x for s in seqs for x in s])   # [B*K, T_l]
    return inputs, target_of(examples, task), K


def _rows(x, valid):
    """[B, L, C] (+ [B, L] valid) -> list of B tensors [L_i, C] without padding (video grids kept whole)."""
    if valid is None:
        return list(x.unbind(0))
    return [x[i, valid[i]] for i in range(x.shape[0])]


def _pad_rows(rows):
    """list of [L_i, C] (or equal-shape video grids) -> (padded [B, L, C], valid [B, L] or None)."""
    if rows[0].dim() != 2:
        return torch.stack(rows), None
    L = max(r.shape[0] for r in rows)
    x = rows[0].new_zeros(len(rows), L, rows[0].shape[1])
    valid = torch.zeros(len(rows), L, dtype=torch.bool, device=x.device)
    for i, r in enumerate(rows):
        x[i, :len(r)], valid[i, :len(r)] = r, True
    return x, valid


@torch.no_grad()
def encode_examples(icode, examples, task, modalities, dcfg, tokenizer, device, batch_size=32):
    """Run the (frozen) encoders once: -> per example {m: [L, C] (video [T_v, H_v, W_v, C]); "text": a list
    of K [L, C]} for `modalities`. Fine-tuning then runs only the fusion network and the head each epoch."""
    icode.eval()
    enc = FineTuner(icode, task, 1, modalities)
    out = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        inputs, _, K = make_inputs(chunk, task, modalities, dcfg, tokenizer)
        feats, valids = enc.encode(D.to_device(inputs, device))
        per = {m: [r.cpu() for r in _rows(feats[m], valids[m])] for m in feats}
        for j in range(len(chunk)):
            f = {m: per[m][j] for m in per if m != "text"}
            if "text" in per:
                f["text"] = per["text"][j * K:(j + 1) * K]
            out.append(f)
    return out


def cached_features(icode, splits, task, init_key, cache, dcfg, tokenizer, device, batch_size=32):
    """{split: [{"feats", "ex", "K"}]} with the encoder outputs of every modality the examples have, computed
    once per initialisation: video and audio features are shared by all tasks, text features by all tasks
    but multiple choice (whose text rows are question [SEP] candidate [SEP] subtitles)."""
    avail = modalities_of(splits["train"], task)
    groups = [("av", tuple(m for m in avail if m != "text")), ("text:mc" if task == "mc" else "text", ("text",))]
    out = {}
    for s in ("train", "validation", "test"):
        feats = [{} for _ in splits[s]]
        for name, mods in groups:
            if not mods or not set(mods) <= set(avail):
                continue
            key = (init_key, s, name)
            if key not in cache:
                cache[key] = encode_examples(icode, splits[s], task, mods, dcfg, tokenizer, device, batch_size)
            for f, g in zip(feats, cache[key]):
                f.update(g)
        out[s] = [{"feats": f, "ex": ex, "K": len(f.get("text", [None]))} for f, ex in zip(feats, splits[s])]
    return out


def collate_features(items, task, modalities):
    """Cached items -> (feats, valids, target, K) as FineTuner.forward takes them, for `modalities` only."""
    feats, valids = {}, {}
    for m in modalities:
        rows = [r for it in items for r in (it["feats"][m] if m == "text" else [it["feats"][m]])]
        feats[m], valids[m] = _pad_rows(rows)
    ks = sorted({it["K"] for it in items})
    if len(ks) > 1:
        raise ValueError(f"every question needs the same number of candidates, got {ks}")
    return feats, valids, target_of([it["ex"] for it in items], task), ks[0]


# ----------------------------------------------------------------------------------------------------
# Fine-tuning: early stopping on the validation split, best-epoch selection, seeds (appendix A.2)

def _batches(items, batch_size):
    return [items[i:i + batch_size] for i in range(0, len(items), batch_size)]


def _forward(ft, items, task, cached, dcfg, tokenizer, device):
    """A batch of examples (or cached feature items) -> (logits, target). `ft` may be DDP-wrapped."""
    mods = getattr(ft, "module", ft).modalities
    if cached:
        feats, valids, target, K = collate_features(items, task, mods)
        return ft(feats=D.to_device(feats, device), valids=D.to_device(valids, device), n_candidates=K), target.to(device)
    inputs, target, K = make_inputs(items, task, mods, dcfg, tokenizer)
    return ft(D.to_device(inputs, device), n_candidates=K), target.to(device)


@torch.no_grad()
def evaluate(ft, items, task, cached, dcfg, tokenizer, device, batch_size=32, glue_task=None):
    """Metrics of `ft` on a whole split. Every rank evaluates the full split with identical weights, so all
    ranks take the same early-stopping decision without communicating."""
    was = ft.training
    ft.eval()
    preds, targets = [], []
    for b in _batches(items, batch_size):
        logits, target = _forward(ft, b, task, cached, dcfg, tokenizer, device)
        preds.append(predict(task, logits).float().cpu())
        targets.append(target.cpu())
    ft.train(was)
    return task_metrics(task, torch.cat(preds), torch.cat(targets), glue_task)


def _freeze_unused(ft, items, task, cached, dcfg, tokenizer, device):
    """Freeze every parameter a training forward does not reach: the pretraining heads, encoders and fusion
    projections of modalities left out (--modalities), co-attention modules of absent modalities. DDP needs
    every trainable parameter to get a gradient, and the optimiser then holds only what is trained."""
    ft.train()
    for p in ft.parameters():
        p.grad = None
    logits, target = _forward(ft, items[:2], task, cached, dcfg, tokenizer, device)
    loss_fn(task, logits, target).backward()
    for p in ft.parameters():
        if p.grad is None:
            p.requires_grad_(False)
        p.grad = None


def _train_epoch(ft, ddp, opt, items, task, cached, dcfg, tokenizer, d, batch_size, clip, g):
    """One pass over this rank's share of the training split, in an order drawn from `g` (the same on every
    rank; every rank takes as many steps), AdamW on gradients clipped at `clip`. Returns the mean loss."""
    ft.train()
    perm = torch.randperm(len(items), generator=g).tolist()
    n = len(perm) // d.world * d.world if d.world > 1 else len(perm)   # equal steps on every rank
    mine = [items[i] for i in perm[:n][d.rank::d.world]]
    losses = []
    for b in _batches(mine, batch_size):
        logits, target = _forward(ddp, b, task, cached, dcfg, tokenizer, d.device)
        loss = loss_fn(task, logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            nn.utils.clip_grad_norm_([p for p in ft.parameters() if p.requires_grad], clip)
        opt.step()
        losses.append(loss.item())
    return float(np.mean(losses)) if losses else float("nan")


def finetune(task, splits, *, ckpt, fusion, modalities, seed, dcfg, tokenizer, d, preset="tiny", lr=1e-3,
             lr_encoders=0.0, weight_decay=0.01, epochs=10, patience=3, batch_size=32, clip=1.0, glue_task=None,
             feature_cache=None, out_dir=None, log=print, encoders=None):
    """Fine-tune one model and test it. Returns {"val": best validation metrics, "test": test metrics at the
    best epoch, "best_epoch", "epochs_run", "seconds"}.

    splits: {"train" | "validation" | "test": list of examples}. ckpt: pretraining checkpoint folder, or None
    for no fusion pretraining (`load_model`: the `encoders` folders under a fresh fusion, or all fresh).
    lr_encoders == 0 freezes the encoders; their outputs are then computed once per split (and reused across
    runs through `feature_cache`, a dict), so each epoch runs only the fusion network and the head. Constant learning rates, AdamW from
    `train.build_optimizer` (the head joins the fusion group), gradient clipping at `clip`.
    Model selection: the epoch with the best validation metric (SELECT; the first GLUE metric) is kept, and
    training stops after `patience` epochs without improvement. With out_dir, rank 0 writes the best
    weights there (`training.checkpoint.save_weights`, safetensors).
    """
    t0 = time.time()
    device = d.device
    if task == "mc" and "text" not in modalities:
        raise ValueError("multiple choice needs the language modality L (the candidates are text)")
    for s, examples in splits.items():
        lacking = [m for m in modalities if m not in modalities_of(examples, task)]
        if lacking:
            raise ValueError(f"the {s} split has no {lacking} (its manifest gives "
                             f"{list(modalities_of(examples, task))}); choose --modalities among those")
    torch.manual_seed(seed)                       # the same initial head on every rank (DDP also broadcasts)
    icode = load_model(ckpt, preset, fusion, tokenizer.vocab_size, encoders)
    ft = FineTuner(icode, task, head_outputs(task, glue_task), modalities).to(device)
    cached = lr_encoders == 0
    if cached:
        for enc in (icode.text, icode.vision, icode.speech):
            enc.requires_grad_(False)
        # pretrained encoders are the same for every seed; fresh ones depend on it (and not on the fusion
        # mode: ICode builds the encoders before the fusion network)
        init_key = ckpt or (f"encoders:{encoders['text']}" if encoders else f"init:{preset}:{seed}")
        cache = feature_cache if feature_cache is not None else {}
        data = cached_features(icode, splits, task, init_key, cache, dcfg, tokenizer, device, batch_size)
    else:
        data = splits
    # Encoding draws random numbers (collate's masks) only when the features are not cached yet: restart the
    # stream so that dropout and the rest are the same whether or not an earlier run filled the cache.
    torch.manual_seed(seed)
    _freeze_unused(ft, data["train"], task, cached, dcfg, tokenizer, device)
    opt = build_optimizer(ft.icode, lr, lr_encoders, weight_decay)
    opt.add_param_group({"params": list(ft.head.parameters()), "lr": lr, "base_lr": lr,
                         "weight_decay": weight_decay, "name": "head"})
    ddp = wrap_ddp(ft, d)
    select, lower = selection_metric(task, glue_task)
    best, best_state, best_epoch, stale, epoch = None, None, -1, 0, 0
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        loss = _train_epoch(ft, ddp, opt, data["train"], task, cached, dcfg, tokenizer, d, batch_size, clip, g)
        val = evaluate(ft, data["validation"], task, cached, dcfg, tokenizer, device, batch_size, glue_task)
        score = val[select]
        log(f"  epoch {epoch + 1}: train loss {loss:.4f}  val {select} {score:.4f}")
        if best is None or (score < best if lower else score > best):
            best, best_epoch, stale, best_val = score, epoch, 0, val
            best_state = {k: p.detach().cpu().clone() for k, p in ft.named_parameters() if p.requires_grad}
            if out_dir is not None and d.is_main:
                save_weights(ft, out_dir)
        else:
            stale += 1
            if stale >= patience:
                break
    with torch.no_grad():
        params = dict(ft.named_parameters())
        for k, v in best_state.items():
            params[k].copy_(v)
    test = evaluate(ft, data["test"], task, cached, dcfg, tokenizer, device, batch_size, glue_task)
    return {"val": best_val, "test": test, "best_epoch": best_epoch + 1, "epochs_run": epoch + 1,
            "seconds": time.time() - t0}


def load_model(ckpt, preset_name, fusion, text_vocab, encoders=None):
    """A pretraining checkpoint's model (`ICode.from_checkpoint`), or with ckpt=None no fusion pretraining: the
    single-modality encoders of `encoders` ({"text", "vision", "speech"}: folders, `model.load_encoder`) under a
    fresh fusion network (the paper's "No Pretrain", section 5.1), or without them a fresh model of the preset.
    In training mode."""
    if ckpt is None:
        cfg = preset(preset_name, fusion, text_vocab)
        return with_encoders(cfg, encoders["text"], encoders["vision"], encoders["speech"]) if encoders else ICode(cfg)
    return ICode.from_checkpoint(ckpt).train()


def checked_encoder_folders(root):
    """`encoder_folders(root)` (stage one's layout, training/encoders.py), each checked to hold a config.json;
    None when root is None."""
    if root is None:
        return None
    folders = encoder_folders(root)
    missing = [f for f in folders.values() if not os.path.isfile(os.path.join(f, "config.json"))]
    if missing:
        raise FileNotFoundError(f"{root!r} lacks the encoder folders {missing} (config.json + model.safetensors; "
                                f"`python train.py` writes them for the toy world)")
    return folders


def modalities_of(examples, task):
    """The modalities the examples provide (the manifest's), in MODALITIES order."""
    if task == "glue":
        return ("text",)
    return tuple(m for m in MODALITIES if m in examples[0]["modalities"])


def mean_std(runs):
    """[{metric: value}] over seeds -> {metric: (mean, sample std with ddof=1; 0.0 for one run)}.
    Appendix A.2 reports mean +- std over 5 fine-tuning seeds."""
    keys = runs[0].keys()
    out = {}
    for k in keys:
        v = np.array([r[k] for r in runs], dtype=np.float64)
        out[k] = (float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0)
    return out


# ----------------------------------------------------------------------------------------------------
# Command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="report", choices=("report",) + TASKS + ("retrieval",),
                   help="report (default): the toy world's tables; or one task on your manifests")
    p.add_argument("--train", default=None, help="labelled training manifest (default: the toy world's)")
    p.add_argument("--val", default=None, help="validation manifest: early stopping and model selection")
    p.add_argument("--test", default=None, help="test manifest (retrieval: the clips to retrieve among)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the toy world's)")
    p.add_argument("--toy-dir", default=TOY_DIR, help="the toy world (made with pipeline.toy.make_toy if missing)")
    p.add_argument("--toy-size", default="default", help="make_toy size when the toy world is missing")
    p.add_argument("--ckpt", default=None, help="pretraining checkpoint or run folder (its latest ckpt_*); "
                   "'none' = no pretraining; default: runs/toy when it holds a checkpoint (the report's D+V+M)")
    p.add_argument("--encoders", default=None, help="with --ckpt none: a folder with text/, vision/, speech/ "
                   "encoder folders to start from under a fresh fusion (the paper's No Pretrain)")
    p.add_argument("--runs-dir", default="runs", help="report: where the rows' pretraining runs are (made if missing)")
    p.add_argument("--preset", default="tiny", choices=["tiny", "paper"], help="model size without a checkpoint")
    p.add_argument("--fusion", default=None, choices=["merge", "co"],
                   help="fusion without a checkpoint (default merge; a checkpoint has its own)")
    p.add_argument("--modalities", default=None,
                   help="one task: modalities at fine-tuning and test time, e.g. L,S (default V,L,S)")
    p.add_argument("--epochs", type=int, default=None, help="maximum fine-tuning epochs (default 10)")
    p.add_argument("--patience", type=int, default=3, help="stop after this many epochs without a better val")
    p.add_argument("--batch", type=int, default=32, help="batch size per process")
    p.add_argument("--lr", type=float, default=None, help="fusion + head LR (default: tiny 1e-3, paper 2e-5)")
    p.add_argument("--lr-encoders", type=float, default=None,
                   help="encoders LR; 0 freezes them and caches their outputs (default: tiny 0, paper 1e-5)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping (0: off)")
    p.add_argument("--seeds", type=int, default=None,
                   help="fine-tuning runs with seeds seed..seed+n-1: mean +- std (default: report 3, a task 1)")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--glue-task", default=None, choices=sorted(GLUE_SPECS), help="GLUE task (--task glue)")
    p.add_argument("--glue-dir", default=None, help="folder with the task's train.tsv and dev.tsv")
    p.add_argument("--max-train", type=int, default=None, help="use only the first N training examples")
    p.add_argument("--out", default=os.path.join("runs", "eval"), help="results, best weights, report")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    a = p.parse_args(argv)
    a.epochs = a.epochs if a.epochs is not None else 10
    a.seeds = a.seeds if a.seeds is not None else (3 if a.task == "report" else 1)
    if a.seeds < 1:
        p.error(f"--seeds must be at least 1, got {a.seeds}")
    if a.epochs < 1:
        p.error(f"--epochs must be at least 1, got {a.epochs}")
    a.lr = a.lr if a.lr is not None else (1e-3 if a.preset == "tiny" else 2e-5)
    a.lr_encoders = a.lr_encoders if a.lr_encoders is not None else (0.0 if a.preset == "tiny" else 1e-5)
    if a.task == "glue" and (a.glue_task is None or a.glue_dir is None):
        p.error("--task glue needs --glue-task and --glue-dir")
    if a.task == "report" and (a.modalities or a.fusion):
        p.error(f"the report runs Table 8's seven modality subsets and both fusion modes itself: --modalities "
                f"{a.modalities} / --fusion {a.fusion} apply to one --task (sentiment, emotion, ...)")
    a.modalities = a.modalities or "V,L,S"
    return a


def _toy(args):
    if not os.path.isfile(os.path.join(args.toy_dir, "toy_world.json")):
        print(f"making the toy world in {args.toy_dir}/ (size {args.toy_size}) ...", flush=True)
        make_toy(args.toy_dir, size=args.toy_size)
    return {s: args.__dict__[k] or os.path.join(args.toy_dir, f"downstream_{s}.jsonl")
            for s, k in (("train", "train"), ("validation", "val"), ("test", "test"))}


def run_seeds(task, splits, args, d, ckpt, fusion, modalities, dcfg, tokenizer, cache, out_dir=None, encoders=None,
              bar=None):
    """args.seeds fine-tuning runs -> {"test": {metric: (mean, std)}, "val": ..., "runs": [...]}. With `bar` (a
    tqdm progress bar) each run advances it instead of printing its epochs."""
    runs = []
    log = print if d.is_main and bar is None else (lambda *a, **k: None)
    for k in range(args.seeds):
        seed = args.seed + k
        log(f"{task} | {'pretrained ' + ckpt if ckpt else 'no pretraining'} | {fusion} | "
              f"{modality_letters(modalities)} | seed {seed}", flush=True)
        r = finetune(task, splits, ckpt=ckpt, fusion=fusion, modalities=modalities, seed=seed, dcfg=dcfg,
                     tokenizer=tokenizer, d=d, preset=args.preset, lr=args.lr, lr_encoders=args.lr_encoders,
                     weight_decay=args.weight_decay, epochs=args.epochs, patience=args.patience,
                     batch_size=args.batch, clip=args.clip, glue_task=args.glue_task, feature_cache=cache,
                     out_dir=None if out_dir is None else os.path.join(out_dir, f"seed{seed}"),
                     log=log, encoders=encoders)
        runs.append(r)
        if bar is not None:
            bar.update(1)
    return {"test": mean_std([r["test"] for r in runs]), "val": mean_std([r["val"] for r in runs]), "runs": runs}


def main(argv=None):
    args = parse_args(argv)
    d = setup_distributed(args.device)
    dcfg = D.TOY_DATA if args.preset == "tiny" else D.PAPER_DATA
    if args.task == "report":
        return report(args, d, dcfg)
    paths = _toy(args) if args.task != "glue" and not (args.train or args.test) else \
        {"train": args.train, "validation": args.val, "test": args.test}
    tok_path = args.tokenizer or os.path.join(args.toy_dir, "tokenizer.json")
    tokenizer = load_tokenizer(tok_path)
    ckpt = resolve_ckpt(args.ckpt if args.ckpt is not None else
                        (TOY_OUT if checkpoints(TOY_OUT) else None))
    fusion = check_preset(ckpt, args.preset, args.fusion) if ckpt else (args.fusion or "merge")
    if args.task == "retrieval":
        model = load_model(ckpt, args.preset, fusion, tokenizer.vocab_size).to(d.device)
        res = zero_shot_retrieval(model, paths["test"], dcfg, tokenizer, d.device, args.batch)
        print_retrieval_table(res)
        return res
    if args.task == "glue":
        splits = load_glue(args.glue_dir, args.glue_task, tokenizer, dcfg.max_text_len)
    else:
        missing = [s for s, p in paths.items() if not p]
        if missing:
            raise ValueError(f"give --train, --val and --test (missing {missing})")
        splits = {s: load_examples(p, dcfg, tokenizer) for s, p in paths.items()}
    if args.max_train:
        splits["train"] = splits["train"][:args.max_train]
    mods = ("text",) if args.task == "glue" else parse_modalities(args.modalities)
    out_dir = os.path.join(args.out, f"{args.task}_{modality_letters(mods)}")
    encoders = checked_encoder_folders(args.encoders) if ckpt is None else None
    res = run_seeds(args.task, splits, args, d, ckpt, fusion, mods, dcfg, tokenizer, {}, out_dir, encoders)
    if d.is_main:
        print(f"\n{args.task} ({modality_letters(mods)}, {args.seeds} seed(s), test split, best val epoch):")
        for k, ms in res["test"].items():
            print(f"  {k:12s} {fmt(k, ms)}")
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump({"args": vars(args), "ckpt": ckpt, "fusion": fusion,
                       "examples": {s: len(v) for s, v in splits.items()}, **res}, f, indent=1, default=str)
    return res


# ----------------------------------------------------------------------------------------------------
# The paper's tables in miniature on the toy world (`python eval.py`)

def report(args, d, dcfg):
    """Tables 1-2 (the five rows of ROWS x sentiment, emotion, binary, multiple choice), Table 8 (SUBSET_ROW on
    the seven modality subsets) and zero-shot retrieval on the toy world, each fine-tuning result the mean +- std
    over args.seeds seeds; the paper's claims checked against them (evaluation/report.py). Writes
    <out>/report.md, report.png and results.json; returns the results dict."""
    from tqdm import tqdm
    t0 = time.time()
    paths = _toy(args)
    tokenizer = load_tokenizer(args.tokenizer or os.path.join(args.toy_dir, "tokenizer.json"))
    main_dir = args.ckpt or TOY_OUT
    if not (os.path.isfile(os.path.join(main_dir, "state.json")) or checkpoints(main_dir)):
        raise FileNotFoundError(f"no pretraining run in {main_dir!r}: run `python train.py` first (the report's "
                                f"{MAIN_ROW} row, and the recipe and encoders of the other rows)")
    main_ckpt = resolve_ckpt(main_dir)
    recorded = read_state(main_ckpt)["args"]
    encoders = ({m: recorded[f"{m}_encoder"] for m in ("text", "vision", "speech")}
                if recorded.get("text_encoder") else None)        # the encoders the main run started from
    ckpts = pretrain_rows(main_ckpt, args.toy_dir, args.runs_dir, d.device)
    splits = {s: load_examples(p, dcfg, tokenizer) for s, p in paths.items()}
    if args.max_train:
        splits["train"] = splits["train"][:args.max_train]
    cache, full = {}, ("video", "text", "audio")
    results = {"tables": {}, "subsets": {}, "retrieval": {}, "seeds": args.seeds, "encoders": encoders,
               "subset_row": SUBSET_ROW,
               "ckpts": ckpts, "steps": recorded["steps"]}
    jobs = len(ROWS) * 4 + len(SUBSET_TASKS) * (len(SUBSETS) - 1)
    with tqdm(total=jobs * args.seeds, desc="fine-tuning", dynamic_ncols=True, disable=not d.is_main) as bar:
        for task in ("sentiment", "emotion", "binary", "mc"):
            for row, c in ckpts.items():
                bar.set_postfix_str(f"{task} {row}")
                results["tables"].setdefault(task, {})[row] = run_seeds(
                    task, splits, args, d, c, ROWS[row][1], full, dcfg, tokenizer, cache, encoders=encoders, bar=bar)
        for task in SUBSET_TASKS:
            for mods in SUBSETS:
                bar.set_postfix_str(f"{task} {SUBSET_ROW} {modality_letters(mods)}")
                r = results["tables"][task][SUBSET_ROW] if mods == full else run_seeds(
                    task, splits, args, d, ckpts[SUBSET_ROW], ROWS[SUBSET_ROW][1], mods, dcfg, tokenizer, cache,
                    encoders=encoders, bar=bar)
                results["subsets"].setdefault(task, {})[modality_letters(mods)] = r
    held = os.path.join(args.toy_dir, TOY_HELDOUT)
    held_ex = load_examples(held, dcfg, tokenizer)
    for row, c in ckpts.items():
        if c is not None:
            model = load_model(c, args.preset, ROWS[row][1], tokenizer.vocab_size).to(d.device)
            results["retrieval"][row] = zero_shot_retrieval(model, held_ex, dcfg, tokenizer, d.device, args.batch)
    results["ceiling"] = toy_ceiling(held)
    results["seconds"] = time.time() - t0
    if d.is_main:
        os.makedirs(args.out, exist_ok=True)
        md = report_markdown(results, args, splits, argv_line=" ".join(["python", "eval.py"] + sys.argv[1:])
                             if os.path.basename(sys.argv[0]) == "eval.py" else "eval.main(...)")
        with open(os.path.join(args.out, "report.md"), "w") as f:
            f.write(md)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)
        plot_report(results, os.path.join(args.out, "report.png"))
        print(md)
        print(f"wrote {args.out}/report.md, report.png, results.json in {results['seconds']:.0f} s")
    return results


if __name__ == "__main__":
    main()
