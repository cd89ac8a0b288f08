"""Zero-shot cross-modal retrieval from the contrastive space (section 4.2.2; no fine-tuning): each modality of a
clip fused alone and mean-pooled, as the contrastive loss sees it, then R@1/5/10 in both directions per pair.
train.py prints it after pretraining on the toy world; `python eval.py --task retrieval` on any manifest.
"""
import itertools
import json

import torch
import torch.nn.functional as F

from data import collate, to_device
from evaluation.metrics import retrieval_recall
from model.fusion import MODALITIES
from pipeline.manifest import load_examples


@torch.no_grad()
def contrastive_space(model, examples, dcfg, tokenizer, device, batch_size=16):
    """Unit-norm contrastive vectors {m: [N, D]}: each modality through the fusion network alone, mean-pooled
    (`ICode.contrastive_representations`), on the unmasked inputs (text: [CLS] caption [SEP] transcript [SEP])."""
    model.eval()
    out = {}
    for b in (examples[i:i + batch_size] for i in range(0, len(examples), batch_size)):
        batch = to_device(collate(b, dcfg, tokenizer), device)
        feats, valids = model.pretrain_features(batch, masked=False)           # the unmasked inputs
        for m, r in model.contrastive_representations(feats, valids).items():
            out.setdefault(m, []).append(F.normalize(r.float(), dim=-1).cpu())
    return {m: torch.cat(v) for m, v in out.items()}


def zero_shot_retrieval(model, manifest, dcfg, tokenizer, device="cpu", batch_size=16, ks=(1, 5, 10)):
    """R@K in both directions for every pair of the manifest's modalities: clip i's modality a retrieves
    among the N clips' modality b by cosine similarity, its own clip being the one positive.
    Returns {"n": N, "video->text": {"R@1": ...}, "text->video": {...}, ...} (fractions)."""
    examples = load_examples(manifest, dcfg, tokenizer) if isinstance(manifest, str) else manifest
    reps = contrastive_space(model, examples, dcfg, tokenizer, device, batch_size)
    res = {"n": len(examples)}
    for a, b in itertools.combinations([m for m in MODALITIES if m in reps], 2):
        sim = reps[a] @ reps[b].T                                          # [N, N], row i's positive: column i
        res[f"{a}->{b}"] = retrieval_recall(sim, ks)
        res[f"{b}->{a}"] = retrieval_recall(sim.T, ks)
    return res


def ceiling(keys, ks=(1, 5, 10)):
    """The best expected R@K when clips with equal keys cannot be told apart: a model that knows every clip's
    key and nothing else ranks the n clips sharing the query's key first, in a random order among themselves,
    so the positive is in the top K with probability min(1, K / n). keys: one hashable per clip.
    Returns {"R@K": mean over clips of min(1, K / n)}."""
    count = {}
    for k in keys:
        count[k] = count.get(k, 0) + 1
    return {f"R@{K}": sum(min(1.0, K / count[k]) for k in keys) / len(keys) for K in ks}


def toy_ceiling(manifest, ks=(1, 5, 10)):
    """The ceiling identical descriptions impose on retrieval among the toy world's held-out clips: the frames
    show only colour, shape and motion (the row's "caption"), so directions with video cannot beat `ceiling`
    over captions; text and speech carry the same words (the row's "text"), so text<->audio is bounded by
    clips with the same transcript. Returns {direction: {"R@K": ...}} like `zero_shot_retrieval`."""
    with open(manifest) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    seen, said = ceiling([r["caption"] for r in rows], ks), ceiling([r["text"] for r in rows], ks)
    return {f"{a}->{b}": said if {a, b} == {"text", "audio"} else seen
            for a, b in itertools.permutations(MODALITIES, 2)}


def mean_recall(res, k="R@5"):
    """The mean of R@K over the directions of a `zero_shot_retrieval` result."""
    dirs = [d for d in res if "->" in d]
    return sum(res[d][k] for d in dirs) / len(dirs)


def retrieval_table(res, title=None, limit=None):
    """Markdown table of zero_shot_retrieval's result (percent), with `limit` ({direction: {"R@K"}}, e.g.
    `toy_ceiling`) beside each recall when given."""
    dirs = [k for k in res if "->" in k]
    ks = list(res[dirs[0]]) if dirs else []
    lines = [f"{title or 'Zero-shot retrieval'} ({res['n']} clips; chance R@1 = {100 / max(1, res['n']):.1f}"
             + ("; ceiling: the best any model can do when clips with the same description are indistinguishable"
                if limit else "") + ")", "",
             "| direction | " + " | ".join(ks + [f"ceiling {k}" for k in ks] * bool(limit)) + " |",
             "|---|" + "---|" * len(ks) * (2 if limit else 1)]
    for k in dirs:
        cells = [f"{100 * res[k][r]:.1f}" for r in ks] + ([f"{100 * limit[k][r]:.1f}" for r in ks] if limit else [])
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines.append(f"\nmean R@5 over the {len(dirs)} directions: {100 * mean_recall(res):.1f}"
                 + (f" (ceiling {100 * mean_recall({k: limit[k] for k in dirs}):.1f})" if limit else ""))
    return "\n".join(lines)


def print_retrieval_table(res, limit=None):
    print(retrieval_table(res, limit=limit), flush=True)
