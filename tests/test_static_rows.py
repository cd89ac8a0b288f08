"""training/static_rows.py: the fixed-size masked-position selection CUDA graphs need gives the exact selection's
loss and gradients, and its bounds hold for data.py's masks and are reached."""
import functools

import pytest
import torch
from common import assert_close, grads, make_batch, make_model

import data as D
import training.speed
from data import mask_tokens, span_mask, span_mask_batch, tube_mask
from losses import PAPER_WEIGHTS as WEIGHTS
from losses import count_targets, masked_unit_loss
from model.heads import MLMHead, MSMHead, MVMHead
from train import PretrainObjective
from training.static_rows import (check_masked_rows, mask_tokens_max, masked_rows, select_masked_static, span_mask_max,
                                  tube_mask_max)


def static(rows):
    return functools.partial(select_masked_static, rows=rows)


def _loss_and_grads(head, x, labels, **kw):
    head.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    loss = masked_unit_loss(*head(x, labels, **kw))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in head.named_parameters() if p.grad is not None}, x.grad


def _heads_and_inputs():
    """Each head with features and labels whose masked count is known: (head, x, labels, M)."""
    torch.manual_seed(1)
    text = torch.full((2, 9), -100)
    text[0, [1, 4]], text[1, [0, 2, 8]] = torch.tensor([3, 5]), torch.tensor([7, 1, 2])
    video = torch.full((1, 2, 4, 4), -100)
    video[0, 1, :2, 1:3] = torch.tensor([[0, 5], [2, 6]])
    audio = torch.full((2, 7, 2), -100)
    audio[0, 2:5] = torch.tensor([[1, 2], [3, 4], [0, 0]])
    audio[1, 6, 0] = 4                                           # one group only
    return [(MLMHead(8, 11), torch.randn(2, 9, 8), text, 5),
            (MVMHead(8, 7), torch.randn(1, 1, 2, 2, 8), video, 4),
            (MSMHead(8, groups=2, vars=5), torch.randn(2, 7, 8), audio, 4),
            (MSMHead(8, groups=2, vars=5, combined=True), torch.randn(2, 7, 8), audio[:, :, :1].expand(2, 7, 2).clone(), 4)]


@pytest.mark.parametrize("which", range(4))
def test_static_rows_give_the_exact_selection_padded(which):
    """A fixed number of rows (a static bound, `masked_rows`): the masked positions in the same order, then padding rows
    labelled -100, and the same loss and gradients as the exact selection; rows equal to the count is the
    exact selection itself; a bound below the count is an error, not a shortened selection."""
    head, x, labels, M = _heads_and_inputs()[which]
    logits, targets = head(x, labels)
    per = logits.shape[0] // M                                   # per-group MSM: G rows a frame
    s_logits, s_targets = head(x, labels, select=static(M + 3))
    assert s_logits.shape[0] == (M + 3) * per
    assert torch.equal(s_targets[:M * per], targets) and (s_targets[M * per:] == -100).all()
    assert torch.allclose(s_logits[:M * per], logits, atol=1e-6)
    exact, fixed = _loss_and_grads(head, x, labels), _loss_and_grads(head, x, labels, select=static(M + 3))
    assert torch.allclose(exact[0], fixed[0], rtol=1e-6)
    assert all(torch.allclose(exact[1][k], fixed[1][k], atol=1e-6) for k in exact[1])
    assert torch.allclose(exact[2], fixed[2], atol=1e-6)
    assert torch.equal(head(x, labels, select=static(M))[1], targets)
    with pytest.raises(RuntimeError, match="static bound"):
        head(x, labels, select=static(M - 1))


@pytest.mark.parametrize("length", [1, 9, 10, 37, 389])
def test_static_bounds_hold_and_are_reached(length):
    """mask_tokens_max, tube_mask_max and span_mask_max (masked_rows, the heads' static selections) are
    never exceeded over many draws, and the tube's and the text's are reached (they are the most possible:
    a bound that is reached cannot be lowered; the text's at L = 10 one less, see below)."""
    g = torch.Generator().manual_seed(length)
    ids = torch.randint(10, 100, (2000, length), generator=g)
    n = (mask_tokens(ids, torch.zeros_like(ids, dtype=torch.bool), 4, 100, 0.3, g)[1] != -100).sum(1)
    # floor(0.3 L) + 1 (or all of L); where 0.3 L is a whole number (L = 10) that + 1 is only for rounding
    assert n.max().item() == mask_tokens_max(length, 0.3) - (length == 10), (n.max(), length)
    spans = torch.stack([span_mask(length, 0.08, 10, g) for _ in range(300)]).sum(1)
    assert spans.max().item() <= span_mask_max(length, 0.08, 10), (spans.max(), length)
    if length <= 9:
        tubes = torch.stack([tube_mask(8, length, length, 0.5, g) for _ in range(200)]).flatten(1).sum(1)
        assert tubes.max().item() == tube_mask_max(8, length, length, 0.5), (tubes.max(), length)


def test_masked_rows_of_a_collated_batch():
    """masked_rows from shapes alone: batch 3, 20 text tokens, 4 frames of 4 x 4 cells, 50 speech frames;
    check_masked_rows on the host."""
    cfg = D.DataConfig()
    batch = {"modalities": ("video", "text", "audio"), "text_labels": torch.zeros(3, 20, dtype=torch.long),
             "video_mask": torch.zeros(3, 4, 4, 4, dtype=torch.bool), "audio_mask": torch.zeros(3, 50, dtype=torch.bool)}
    # text: floor(0.3 * 20) + 1 = 7; video: 4 frames x round(0.5 * 16) = 32; audio: (floor(0.08 * 50) + 1) * 10 = 50
    assert masked_rows(cfg, batch) == {"text": 21, "video": 96, "audio": 150}
    assert masked_rows(cfg, dict(batch, modalities=("text",))) == {"text": 21}
    # check_masked_rows: masks as drawn pass; one example over its bound (8 of 20 tokens) is an error
    g = torch.Generator().manual_seed(0)
    batch["text_labels"] = mask_tokens(torch.randint(10, 99, (3, 20), generator=g), torch.zeros(3, 20, dtype=torch.bool),
                                       4, 100, cfg.text_mask_ratio, g)[1]
    batch["video_mask"] = torch.stack([tube_mask(4, 4, 4, cfg.tube_ratio, g) for _ in range(3)])
    batch["audio_mask"] = span_mask_batch([50, 50, 31], 50, cfg.span_p, cfg.span_len, g)
    check_masked_rows(cfg, batch)
    batch["text_labels"][2] = -100
    batch["text_labels"][2, :8] = 5
    with pytest.raises(ValueError, match="example 2 .* 8 masked text positions, more than the 7"):
        check_masked_rows(cfg, batch)


def test_static_rows_make_the_step_capturable_by_cuda_graphs():
    """--compile-mode reduce-overhead (PretrainObjective.static_rows): the compiled forward and backward hold
    nothing that keeps Inductor from capturing them as CUDA graphs (torch._inductor.utils
    .get_first_incompatible_cudagraph_node, the check Inductor runs: ops that sync or have data-dependent
    shapes), and give the exact selection's loss and gradients. The exact selection (a head without `rows`)
    is flagged at its `nonzero` (a data-dependent count), which shows the check can fail. Traced on the CPU
    through AOT autograd without Inductor."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.utils import get_first_incompatible_cudagraph_node
    found = []

    def check(gm, example_inputs):
        found.append(get_first_incompatible_cudagraph_node(gm))
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=check, bw_compiler=check)
    model = make_model()
    batch = make_batch(model, B=3)
    targets = model.targets(batch)
    norms = count_targets(targets, False)
    results = []
    for run in (PretrainObjective(model, WEIGHTS),          # eager, exact selection: the reference
                training.speed.compile_step(PretrainObjective(model, WEIGHTS, static_rows=D.TOY_DATA), backend=backend)):
        torch._dynamo.reset()
        model.zero_grad(set_to_none=True)
        loss, _ = run(batch, targets, norms, 1)
        loss.backward()
        results.append((loss.detach(), grads(model)))
    assert len(found) == 2 and found == [None, None], found        # forward and backward: capturable
    (loss_e, g_e), (loss_s, g_s) = results
    assert torch.allclose(loss_s, loss_e, rtol=1e-6, atol=0), (loss_s, loss_e)
    assert_close(g_s, g_e)             # float32 summation order over other row counts: 2.1e-6 seen
    found.clear()                      # the exact selection, in the MLM head alone
    head = torch.compile(model.mlm_head, backend=backend)
    head(torch.randn(2, 10, model.cfg.fusion.dim, requires_grad=True), batch["text_labels"][:2])[0].sum().backward()
    torch._dynamo.reset()
    assert any(n is not None and "nonzero" in str(n.target) for n in found), found
