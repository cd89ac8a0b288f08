"""i-Code pretraining losses: masked units (section 4.2.1), cross-modality InfoNCE (section 4.2.2,
eqs. (1)-(2)) and the weighted objective (eq. (3)).

Pure functions first, thin modules after (the open_clip / TorchMultimodal pattern):

    masked_unit_loss   cross-entropy over masked positions only, mean over their count (MLM, MVM eq. (6), MSM)
    count_targets      those counts, summed over micro-batches and ranks by train.py
    info_nce           L_a2b + L_b2a, eq. (1), optionally with negatives from every GPU
    pretraining_loss   eq. (3): alpha L_MLM + beta L_MVM + gamma L_MSM + lambda (L_vl + L_vs + L_ls)
    learned_weights_loss  eq. (3) with learned weights (Kendall et al. 2018), the paper's other option
    LogitScales        the learnable temperatures tau_vl, tau_vs, tau_ls (CLIP's convention)
    LearnedLossWeights the learned weights' parameters s_alpha, s_beta, s_gamma, s_lambda
"""
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100
PAIRS = (("video", "text"), ("video", "audio"), ("text", "audio"))   # L_vl, L_vs, L_ls
PAIR_NAMES = {("video", "text"): "vl", ("video", "audio"): "vs", ("text", "audio"): "ls"}


def masked_unit_loss(logits, labels, normalizer=None):
    """Cross-entropy over positions whose label is not -100, normalised by their count.

    logits: [..., V]; labels: [...] long, -100 at positions that do not count (unmasked).
    normalizer: divide the summed cross-entropy by this count instead of the local one (train.py passes
    the number of masked positions of the whole global batch, so that micro-batches and ranks add up to
    exactly the single-batch mean).
    With nothing masked (no rows, as the heads select masked positions only, or only ignored labels) it
    returns an exact zero that keeps every parameter in the graph (so DDP sees the same graph on every
    rank), never NaN (TorchMultimodal's MaskedPredictionLoss).
    """
    logits = logits.reshape(-1, logits.shape[-1])
    labels = labels.reshape(-1)
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(f"logits have {logits.shape[0]} positions but labels {labels.shape[0]}")
    # reduction="sum" over no rows or only-ignored labels is an exact, graph-connected 0; the clamp avoids
    # 0/0. No branch on the number of rows (a data-dependent count under torch.compile) and no .item():
    # this stays free of host-device synchronisation and of graph breaks.
    total = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    n = (labels != IGNORE_INDEX).sum() if normalizer is None else torch.as_tensor(normalizer, device=total.device)
    return total / n.clamp_min(1)


def count_targets(targets, msm_combined):
    """Masked positions per term, [3] float: mlm, mvm, msm; summed over micro-batches and ranks they are the
    normalisers `masked_unit_loss` divides by (the |N_m| of eq. (6) for the whole global batch).
    targets: ICode.targets' {"text" | "video" | "audio": labels, -100 where not masked}; msm_combined: one class
    per masked frame (combined ids) instead of one per codebook group."""
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


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends each rank the gradient of its own slice, summed over ranks.

    Rank r's loss depends on every rank's representations, so the gradient reaching rank s's slice is
    the sum over r of d loss_r / d x_s: an all_reduce(SUM) of the gathered gradient, then the own slice.
    DDP then averages parameter gradients over ranks, which gives the gradient of the mean loss.
    (A plain `dist.all_gather` has no gradient and the loss stalls; open_clip `gather_features`.)
    """

    @staticmethod
    def forward(ctx, x):
        ctx.rank, ctx.world, ctx.n = dist.get_rank(), dist.get_world_size(), x.shape[0]
        out = [torch.empty_like(x) for _ in range(ctx.world)]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_with_grad(x):
    """[b, D] on each rank -> [world * b, D], rank-major, gradients flowing back to every rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def info_nce_directions(r_a, r_b, logit_scale, gather=True):
    """The two directions of eq. (2), with the log (see `info_nce`). Returns (L_a2b, L_b2a).

    r_a, r_b: [b, D] pooled representations of the same b pairs (row i of each is a positive pair).
    logit_scale: scalar log-temperature; logits = exp(logit_scale) * <u_a, u_b>.
    gather: with torch.distributed initialised, the columns are every rank's batch (cross-GPU negatives,
    section 4.2.2) and the rows are this rank's: the "local rows against global columns" form, labels
    offset by rank * b (open_clip `local_loss`). Each rank's loss is the mean over its own rows, so the
    mean over ranks equals the single-process loss on the concatenated batch.
    """
    if r_a.shape != r_b.shape or r_a.dim() != 2:
        raise ValueError(f"r_a {tuple(r_a.shape)} and r_b {tuple(r_b.shape)} must both be [b, D]")
    u_a = F.normalize(r_a.float(), dim=-1)          # u = r / ||r||_2 (section 4.2.2)
    u_b = F.normalize(r_b.float(), dim=-1)
    offset = 0
    all_a, all_b = u_a, u_b
    if gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        all_a, all_b = gather_with_grad(u_a), gather_with_grad(u_b)
        offset = dist.get_rank() * u_a.shape[0]
    scale = logit_scale.exp()
    labels = torch.arange(u_a.shape[0], device=u_a.device) + offset
    with torch.autocast(u_a.device.type, enabled=False):  # the similarities in float32 under bf16 autocast too
        loss_a2b = F.cross_entropy(scale.float() * u_a @ all_b.t(), labels)   # rows: a_i, columns: every b_j
        loss_b2a = F.cross_entropy(scale.float() * u_b @ all_a.t(), labels)   # rows: b_i, columns: every a_j
    return loss_a2b, loss_b2a


def info_nce(r_a, r_b, logit_scale, gather=True):
    """Symmetric InfoNCE, eq. (1): L_ab = L_a2b + L_b2a.

    Eq. (2) as printed lacks the log around the softmax ratio; we implement the standard InfoNCE
    (CLIP, Radford et al. 2021, Figure 3), L_a2b = -1/|B| sum_i log softmax_j(tau <u_a^i, u_b^j>)_i,
    which is what the cited works use.
    """
    a2b, b2a = info_nce_directions(r_a, r_b, logit_scale, gather)
    return a2b + b2a


# Eq. (3)'s weights as the paper sets them (section 4.2.2): alpha, beta, gamma and lambda, and which term each
# multiplies.
PAPER_WEIGHTS = dict(alpha=0.5, beta=0.6, gamma=1.0, lam=1.0)
WEIGHT_OF = {"mlm": "alpha", "mvm": "beta", "msm": "gamma", "vl": "lam", "vs": "lam", "ls": "lam"}


def pretraining_loss(mlm=None, mvm=None, msm=None, vl=None, vs=None, ls=None, *, alpha=PAPER_WEIGHTS["alpha"],
                     beta=PAPER_WEIGHTS["beta"], gamma=PAPER_WEIGHTS["gamma"], lam=PAPER_WEIGHTS["lam"]):
    """Eq. (3): L = alpha L_MLM + beta L_MVM + gamma L_MSM + lambda (L_vl + L_vs + L_ls).

    Defaults: the paper's (PAPER_WEIGHTS). A term that is None (its modality or pair is absent from the
    batch) is skipped. Returns (total, {name: term}) with the unweighted terms.
    """
    weights = dict(alpha=alpha, beta=beta, gamma=gamma, lam=lam)
    terms = {k: v for k, v in dict(mlm=mlm, mvm=mvm, msm=msm, vl=vl, vs=vs, ls=ls).items() if v is not None}
    if not terms:
        raise ValueError("pretraining_loss got no terms: the batch holds no modality")
    total = sum(weights[WEIGHT_OF[k]] * v for k, v in terms.items())
    return total, terms


def learned_weights_loss(terms, log_vars):
    """Eq. (3) with learned combination weights ("we experiment with both fixed and learnable combination
    weights", section 4.2.2), in the homoscedastic-uncertainty form of Kendall et al. (2018, eq. (7), without
    its factors 1/2, as it is usually implemented), which cannot lower the loss by driving a weight to zero:

        L = sum_w ( exp(-s_w) L_w + s_w ),   L_w = the sum of the terms weighted by w (lambda: L_vl + L_vs + L_ls)

    over the weights w in {alpha, beta, gamma, lambda} whose terms are present. The effective weight is
    exp(-s_w); dL/ds_w = 1 - exp(-s_w) L_w, zero where exp(-s_w) = 1 / L_w.
    terms: {name: term} as `pretraining_loss` takes them (absent terms left out); log_vars: {w: s_w scalar}.
    Returns (total, {name: term})."""
    if not terms:
        raise ValueError("learned_weights_loss got no terms: the batch holds no modality")
    unknown = set(terms) - set(WEIGHT_OF)
    if unknown:
        raise ValueError(f"unknown loss terms {sorted(unknown)}; known: {sorted(WEIGHT_OF)}")
    total = 0.0
    for w in dict.fromkeys(WEIGHT_OF.values()):
        group = [v for k, v in terms.items() if WEIGHT_OF[k] == w]
        if group:
            total = total + torch.exp(-log_vars[w]) * sum(group) + log_vars[w]
    return total, terms


class LearnedLossWeights(nn.Module):
    """The parameters s_w of `learned_weights_loss`, one per weight of eq. (3), initialised so that exp(-s_w)
    equals the paper's fixed weight (PAPER_WEIGHTS): at the first step the objective is the fixed-weight
    eq. (3) plus the constant sum_w -ln(w)."""

    def __init__(self, init=PAPER_WEIGHTS):
        super().__init__()
        self.s = nn.ParameterDict({w: nn.Parameter(torch.tensor(-math.log(init[w]))) for w in PAPER_WEIGHTS})

    def weights(self):
        """{w: exp(-s_w)}: the current effective weights (tensors in the graph)."""
        return {w: torch.exp(-s) for w, s in self.s.items()}

    def penalty(self, present):
        """sum of s_w over the weights of the present terms: the part of `learned_weights_loss` that is not
        a weighted term (train.py adds it once per step, not once per micro-batch)."""
        used = {WEIGHT_OF[k] for k in present}
        return sum(self.s[w] for w in self.s if w in used)

    def forward(self, terms):
        return learned_weights_loss(terms, dict(self.s))


class LogitScales(nn.Module):
    """Learnable log-temperatures tau_vl, tau_vs, tau_ls (eq. (2)), one per modality pair.

    Initialised to ln(1/0.07) and clamped to at most ln(100) after every optimiser step, as CLIP does
    (Radford et al. 2021, section 2.5: "clipped to prevent scaling the logits by more than 100").
    """

    INIT = math.log(1 / 0.07)
    MAX = math.log(100.0)

    def __init__(self):
        super().__init__()
        self.scale = nn.ParameterDict({n: nn.Parameter(torch.tensor(self.INIT)) for n in PAIR_NAMES.values()})

    @torch.no_grad()
    def clamp_(self):
        for p in self.scale.values():
            p.clamp_(max=self.MAX)

    def forward(self, pooled, gather=True):
        """pooled: {modality: [b, D]} -> {"vl": L_vl, ...} for every pair present in `pooled`."""
        return {PAIR_NAMES[(a, b)]: info_nce(pooled[a], pooled[b], self.scale[PAIR_NAMES[(a, b)]], gather)
                for a, b in PAIRS if a in pooled and b in pooled}
