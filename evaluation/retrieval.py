"""Zero-shot cross-modal retrieval from the contrastive space (section 4.2.2; no fine-tuning): each modality of a
clip fused alone and mean-pooled, as the contrastive loss sees it, then R@1/5/10 in both directions per pair.
train.py prints it after pretraining on the toy world; `python eval.py --task retrieval` on any manifest.
"""
import itertools

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


def retrieval_table(res, title=None):
    """Markdown table of zero_shot_retrieval's result (percent)."""
    dirs = [k for k in res if "->" in k]
    ks = list(res[dirs[0]]) if dirs else []
    lines = [f"{title or 'Zero-shot retrieval'} ({res['n']} clips; chance R@1 = {100 / max(1, res['n']):.1f})", "",
             "| direction | " + " | ".join(ks) + " |", "|---|" + "---|" * len(ks)]
    lines += [f"| {k} | " + " | ".join(f"{100 * res[k][r]:.1f}" for r in ks) + " |" for k in dirs]
    return "\n".join(lines)


def print_retrieval_table(res):
    print(retrieval_table(res), flush=True)
