"""Loss math: eqs. (1)-(3) against brute-force loops, and the 2-process gathered InfoNCE."""
import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from losses import (PAPER_WEIGHTS, LearnedLossWeights, LogitScales, info_nce, info_nce_directions, learned_weights_loss,
                    masked_unit_loss, pretraining_loss)


def brute_info_nce(r_a, r_b, scale):
    """Eq. (1)-(2) with the log, written as loops over the batch."""
    n = r_a.shape[0]
    u_a = [r_a[i] / r_a[i].norm() for i in range(n)]
    u_b = [r_b[i] / r_b[i].norm() for i in range(n)]
    tau = math.exp(scale) if not torch.is_tensor(scale) else scale.exp()
    a2b = 0.0
    b2a = 0.0
    for i in range(n):
        num = torch.exp(tau * torch.dot(u_a[i], u_b[i]))
        a2b = a2b - torch.log(num / sum(torch.exp(tau * torch.dot(u_a[i], u_b[j])) for j in range(n)))
        b2a = b2a - torch.log(num / sum(torch.exp(tau * torch.dot(u_b[i], u_a[j])) for j in range(n)))
    return a2b / n + b2a / n


def test_info_nce_matches_brute_force_value_and_gradients():
    torch.manual_seed(0)
    r_a = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    r_b = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    fast = info_nce(r_a.float().double(), r_b, s)
    # info_nce computes in float32: compare the float64 brute force at float32 precision
    slow = brute_info_nce(r_a, r_b, s)
    assert torch.allclose(fast.double(), slow, atol=1e-5)
    g_fast = torch.autograd.grad(info_nce(r_a, r_b, s), (r_a, r_b, s))
    g_slow = torch.autograd.grad(brute_info_nce(r_a, r_b, s), (r_a, r_b, s))
    for a, b in zip(g_fast, g_slow):
        assert torch.allclose(a.double(), b, atol=1e-5)


def test_info_nce_is_float32_under_bf16_autocast():
    """The similarities stay float32 inside a bf16 autocast region: the gradient-cache path (which computes
    the contrastive loss outside autocast) and the one-pass path then give the same loss."""
    torch.manual_seed(0)
    r_a, r_b, s = torch.randn(16, 32), torch.randn(16, 32), torch.tensor(math.log(100.0))
    ref = info_nce(r_a, r_b, s)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = info_nce(r_a, r_b, s)
    assert cast.dtype == torch.float32 and abs(cast.item() - ref.item()) < 1e-6


def test_info_nce_symmetric_and_minimised_by_aligned_pairs():
    torch.manual_seed(1)
    r_a, r_b = torch.randn(8, 16), torch.randn(8, 16)
    s = torch.tensor(LogitScales.INIT)
    assert torch.allclose(info_nce(r_a, r_b, s), info_nce(r_b, r_a, s), atol=1e-6)
    a2b, b2a = info_nce_directions(r_a, r_b, s)
    b2a_swapped, a2b_swapped = info_nce_directions(r_b, r_a, s)
    assert torch.allclose(a2b, a2b_swapped) and torch.allclose(b2a, b2a_swapped)
    # Orthogonal, aligned pairs at the maximum scale: the loss approaches its infimum 0.
    eye = torch.eye(8, 16)
    aligned = info_nce(eye, eye * 3.0, torch.tensor(LogitScales.MAX))
    assert aligned < 1e-3
    # Aligned beats random, and random beats anti-aligned (shuffled pairs).
    assert info_nce(r_a, r_a + 0.01 * r_b, s) < info_nce(r_a, r_b, s)
    assert info_nce(eye, eye.roll(1, 0), s) > info_nce(r_a, r_b, s)
    # Closed form: identical, mutually orthogonal unit vectors give 2 * log(1 + (n-1) e^{-tau}).
    tau = math.exp(LogitScales.INIT)
    expect = 2 * math.log(1 + 7 * math.exp(-tau))
    assert abs(info_nce(eye, eye, torch.tensor(LogitScales.INIT)).item() - expect) < 1e-5


def test_masked_unit_loss_counts_only_masked_positions():
    torch.manual_seed(2)
    logits = torch.randn(2, 6, 11, requires_grad=True)
    labels = torch.full((2, 6), -100)
    labels[0, 1], labels[1, 4], labels[1, 5] = 3, 7, 0
    loss = masked_unit_loss(logits, labels)
    logp = logits.log_softmax(-1)
    expect = -(logp[0, 1, 3] + logp[1, 4, 7] + logp[1, 5, 0]) / 3
    assert torch.allclose(loss, expect, atol=1e-6)
    g = torch.autograd.grad(loss, logits)[0]
    assert g[labels == -100].abs().max() == 0           # unmasked positions get no gradient
    none = masked_unit_loss(logits, torch.full((2, 6), -100))
    assert none.item() == 0.0 and not torch.isnan(none) and none.requires_grad
    assert torch.autograd.grad(none, logits)[0].abs().max() == 0


def test_pretraining_loss_weights_and_skips():
    t = {k: torch.tensor(float(i + 1)) for i, k in enumerate(["mlm", "mvm", "msm", "vl", "vs", "ls"])}
    total, terms = pretraining_loss(**t)
    assert abs(total.item() - (0.5 * 1 + 0.6 * 2 + 1 * 3 + 1 * (4 + 5 + 6))) < 1e-6
    assert set(terms) == set(t)
    total, terms = pretraining_loss(mlm=t["mlm"], ls=t["ls"], alpha=2.0, lam=0.5)
    assert set(terms) == {"mlm", "ls"} and abs(total.item() - (2 * 1 + 0.5 * 6)) < 1e-6
    # six different weights: each term is paired with its own (the paper's gamma = lambda = 1 would hide a swap)
    w = dict(alpha=0.1, beta=0.2, gamma=0.3, lam=0.05)
    total, _ = pretraining_loss(**t, **w)
    assert abs(total.item() - (0.1 * 1 + 0.2 * 2 + 0.3 * 3 + 0.05 * (4 + 5 + 6))) < 1e-6
    with pytest.raises(ValueError):
        pretraining_loss()


def test_learned_weights_start_at_the_paper_and_have_the_closed_form_gradient():
    """Eq. (3) with learned weights (Kendall et al. 2018): at initialisation exp(-s_w) is the paper's weight, so
    the loss is the fixed-weight eq. (3) plus sum_w s_w = sum_w -ln(w) over the weights whose terms are present;
    dL/ds_w = 1 - exp(-s_w) L_w (lambda's L_w: the three contrastive terms together)."""
    t = {k: torch.tensor(float(i + 1)) for i, k in enumerate(["mlm", "mvm", "msm", "vl", "vs", "ls"])}
    m = LearnedLossWeights()
    total, terms = m(t)
    fixed, _ = pretraining_loss(**t)
    const = sum(-math.log(w) for w in PAPER_WEIGHTS.values())
    assert terms is t and abs(total.item() - (fixed.item() + const)) < 1e-5
    part = {"mlm": t["mlm"], "vl": t["vl"]}                       # only alpha's and lambda's terms present
    total, _ = m(part)
    assert abs(total.item() - (pretraining_loss(**part)[0].item() - math.log(0.5) - math.log(1.0))) < 1e-6
    with torch.no_grad():                                         # away from the start, other values per weight
        for w, v in zip(m.s, (0.3, -0.2, 0.7, -0.5)):
            m.s[w].fill_(v)
    total, _ = m(t)
    grads = torch.autograd.grad(total, list(m.s.values()))
    L = {"alpha": 1.0, "beta": 2.0, "gamma": 3.0, "lam": 4.0 + 5.0 + 6.0}
    for (w, s), g in zip(m.s.items(), grads):
        assert abs(g.item() - (1 - math.exp(-s.item()) * L[w])) < 1e-5, w
    assert {w: round(v.item(), 6) for w, v in m.weights().items()} == \
        {w: round(math.exp(-v), 6) for w, v in zip(m.s, (0.3, -0.2, 0.7, -0.5))}
    assert m.penalty(["mlm", "vs"]).item() == pytest.approx(0.3 - 0.5)
    with pytest.raises(ValueError, match="bogus"):
        learned_weights_loss({"bogus": t["mlm"]}, dict(m.s))


def test_logit_scales_init_and_clamp():
    m = LogitScales()
    assert set(m.scale) == {"vl", "vs", "ls"}
    assert all(abs(p.item() - math.log(1 / 0.07)) < 1e-6 for p in m.scale.values())
    with torch.no_grad():
        m.scale["vl"].fill_(10.0)
    m.clamp_()
    assert abs(m.scale["vl"].item() - math.log(100)) < 1e-6
    pooled = {"video": torch.randn(4, 8), "audio": torch.randn(4, 8)}
    assert set(m(pooled)) == {"vs"}


# ----------------------------------------------------------------------------------------------------
# Two processes with gloo: gathered loss and gradients equal the single-process ones.

def _worker(rank, world, init_file, r_a, r_b, s, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    b = r_a.shape[0] // world
    a = r_a[rank * b:(rank + 1) * b].clone().requires_grad_(True)
    bb = r_b[rank * b:(rank + 1) * b].clone().requires_grad_(True)
    scale = s.clone().requires_grad_(True)
    loss = info_nce(a, bb, scale)
    loss.backward()
    torch.save({"loss": loss.detach(), "ga": a.grad, "gb": bb.grad, "gs": scale.grad},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_gathered_info_nce_two_processes_equals_single_process():
    torch.manual_seed(3)
    r_a, r_b = torch.randn(6, 8), torch.randn(6, 8)
    s = torch.tensor(2.0)
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(2, os.path.join(d, "init"), r_a, r_b, s, d), nprocs=2, join=True)
        res = [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=True) for r in range(2)]
    a, b, sc = r_a.clone().requires_grad_(True), r_b.clone().requires_grad_(True), s.clone().requires_grad_(True)
    single = info_nce(a, b, sc)
    single.backward()
    # The objective is the mean of the ranks' losses; DDP averages gradients, so rank grads / world
    # (for the rank's own rows) and the mean of the scale grads must equal the single-process ones.
    assert torch.allclose((res[0]["loss"] + res[1]["loss"]) / 2, single, atol=1e-6)
    ga = torch.cat([res[0]["ga"], res[1]["ga"]]) / 2
    gb = torch.cat([res[0]["gb"], res[1]["gb"]]) / 2
    assert torch.allclose(ga, a.grad, atol=1e-6)
    assert torch.allclose(gb, b.grad, atol=1e-6)
    assert torch.allclose((res[0]["gs"] + res[1]["gs"]) / 2, sc.grad, atol=1e-6)
