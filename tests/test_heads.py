"""Tests for model/heads.py: MVM shapes (eq. 4), parity of each head with the naive all-positions path
(full logits + cross-entropy ignoring -100), and the masked-only property: changing anything at an unmasked
position leaves the loss and its gradients exactly unchanged."""
import pytest
import torch
import torch.nn.functional as F

from losses import masked_unit_loss
from model.heads import MLMHead, MSMHead, MVMHead
from model.quantizers import combined_index


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _loss_and_grads(head, x, labels, **kw):
    head.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    loss = masked_unit_loss(*head(x, labels, **kw))
    loss.backward()
    return loss.detach(), _grads(head), x.grad


def _assert_same(a, b):
    (la, ga, xa), (lb, gb, xb) = a, b
    assert torch.equal(la, lb)
    assert ga.keys() == gb.keys() and all(torch.equal(ga[k], gb[k]) for k in ga)
    return xa, xb


# ----------------------------------------------------------------------------------------------------
# MVM: eq. (4)-(6)

@pytest.mark.parametrize("T", [8, 16])
@pytest.mark.parametrize("px", [224, 112])
def test_mvm_shapes(T, px):
    D, K, B = 32, 50, 2
    head = MVMHead(D, K)
    side = -(-px // 32)                          # Swin pads odd grids: 224 -> 7, 112 -> 4 (covers 128 px)
    grid = torch.randn(B, T // 2, side, side, D)  # [B, T_v, H_v, W_v, D]
    assert head.upsample(grid).shape == (B, T, 2 * side, 2 * side, D)   # 224: 4x7x7 -> 8x14x14
    labels = torch.full((B, T, px // 16, px // 16), -100)               # [B, T, H/16, W/16]
    mask = torch.rand(labels.shape, generator=torch.Generator().manual_seed(0)) < 0.5
    labels[mask] = torch.randint(0, K, (int(mask.sum()),))
    logits, targets = head(grid, labels)
    assert logits.shape == (int(mask.sum()), K) and torch.equal(targets, labels[mask])


def test_mvm_deconvolution_closed_form():
    """Eq. (4) with kernel = stride = 2: token cell (2t+i, 2h+j, 2w+k) is GELU(LN(W[:, :, i, j, k]^T g[t, h, w] + b)),
    on a grid with T_v != H_v != W_v so that no two axes can be exchanged unnoticed."""
    torch.manual_seed(0)
    D = 8
    head = MVMHead(D, 5)
    grid = torch.randn(2, 2, 3, 4, D)                                    # [B, T_v, H_v, W_v, D]
    up = head.upsample(grid)
    assert up.shape == (2, 4, 6, 8, D)
    Wt, b = head.deconv.weight, head.deconv.bias                         # [D_in, D_out, 2, 2, 2], [D_out]
    for (n, t, h, w, i, j, k) in [(0, 0, 0, 0, 0, 0, 0), (1, 1, 2, 3, 1, 0, 1), (0, 1, 1, 2, 0, 1, 1), (1, 0, 2, 1, 1, 1, 0)]:
        want = F.gelu(head.layer_norm(grid[n, t, h, w] @ Wt[:, :, i, j, k] + b))
        assert torch.allclose(up[n, 2 * t + i, 2 * h + j, 2 * w + k], want, atol=1e-5)


def test_mvm_rejects_mismatched_labels():
    head = MVMHead(8, 10)
    with pytest.raises(ValueError, match="deconvolved grid"):
        head(torch.randn(1, 4, 7, 7, 8), torch.zeros(1, 8, 12, 14, dtype=torch.long))


def _naive_mvm_logits(head, grid, labels):
    T, h, w = labels.shape[1:]
    return head.classifier(head.upsample(grid)[:, :T, :h, :w])          # [B, T, h, w, K]: every cell


def test_mvm_masked_only():
    torch.manual_seed(0)
    D, K = 16, 40
    head = MVMHead(D, K)
    grid = torch.randn(2, 4, 4, 4, D)                                   # 112 px, 8 frames
    labels = torch.randint(0, K, (2, 8, 7, 7))
    labels[torch.rand(labels.shape) < 0.5] = -100
    labels[0, :2, :2, :2] = -100                 # fused cell (0, 0, 0, 0) has no masked child
    labels[1, 2:4, 4:6, 0:2] = 3                 # fused cell (1, 1, 2, 0) has all children masked
    # Parity with the naive path (all logits, then cross-entropy ignoring -100).
    logits, targets = head(grid, labels)
    naive = F.cross_entropy(_naive_mvm_logits(head, grid, labels).flatten(0, 3), labels.flatten(), ignore_index=-100)
    assert torch.allclose(masked_unit_loss(logits, targets), naive, rtol=1e-5)

    base = _loss_and_grads(head, grid, labels)
    unmasked = grid.clone()
    unmasked[0, 0, 0, 0] += 5.0
    xa, xb = _assert_same(base, _loss_and_grads(head, unmasked, labels))
    assert torch.equal(xa[0, 0, 0, 0], torch.zeros(D)) and torch.equal(xa, xb)
    masked = grid.clone()
    masked[1, 1, 2, 0] += 5.0
    assert not torch.equal(base[0], _loss_and_grads(head, masked, labels)[0])


def test_naive_logits_perturbed_at_unmasked_positions():
    """The loss itself: perturbing full-grid logits where label == -100 changes neither loss nor the
    gradient at masked positions (the identity the heads' selection relies on)."""
    torch.manual_seed(0)
    logits = torch.randn(2, 8, 7, 7, 30)
    labels = torch.randint(0, 30, (2, 8, 7, 7))
    labels[torch.rand(labels.shape) < 0.5] = -100

    def run(lg):
        lg = lg.clone().requires_grad_(True)
        loss = masked_unit_loss(lg, labels)
        loss.backward()
        return loss.detach(), lg.grad

    l0, g0 = run(logits)
    noisy = logits + 10 * torch.randn_like(logits) * (labels == -100)[..., None]
    l1, g1 = run(noisy)
    assert torch.equal(l0, l1) and torch.equal(g0, g1)
    assert torch.equal(g1[labels == -100], torch.zeros_like(g1[labels == -100]))
    l2, _ = run(logits + 10 * torch.randn_like(logits) * (labels != -100)[..., None])
    assert not torch.equal(l0, l2)


# ----------------------------------------------------------------------------------------------------
# MLM

def test_mlm_selects_before_decoder_and_ties():
    torch.manual_seed(0)
    D, V = 16, 1000
    emb = torch.nn.Embedding(V, D)
    head = MLMHead(D, V, embedding_weight=emb.weight)
    assert head.tied and head.decoder.weight is emb.weight
    x = torch.randn(2, 12, D)
    labels = torch.full((2, 12), -100)
    labels[0, 3], labels[1, 0], labels[1, 11] = 7, 999, 0
    seen = []
    head.decoder.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    logits, targets = head(x, labels)
    assert seen == [(3, D)] and logits.shape == (3, V) and targets.tolist() == [7, 999, 0]
    naive = F.cross_entropy(head.decoder(head.layer_norm(F.gelu(head.dense(x)))).flatten(0, 1), labels.flatten(),
                            ignore_index=-100)
    assert torch.allclose(masked_unit_loss(logits, targets), naive, rtol=1e-6)
    masked_unit_loss(logits, targets).backward()
    assert emb.weight.grad is not None and emb.weight.grad.abs().sum() > 0   # the tied weight learns
    with pytest.raises(ValueError, match="tying"):
        MLMHead(8, V, embedding_weight=emb.weight)
    assert not MLMHead(D, V).tied


def test_mlm_masked_only():
    torch.manual_seed(0)
    head = MLMHead(16, 100)
    x = torch.randn(2, 10, 16)
    labels = torch.randint(0, 100, (2, 10))
    labels[:, ::2] = -100
    base = _loss_and_grads(head, x, labels)
    y = x.clone()
    y[0, 4] += 3.0                                # an unmasked position
    _assert_same(base, _loss_and_grads(head, y, labels))
    y[1, 5] += 3.0                                # a masked one
    assert not torch.equal(base[0], _loss_and_grads(head, y, labels)[0])
    # Nothing masked: an exact zero, not NaN, and still in the graph.
    loss = masked_unit_loss(*head(x, torch.full((2, 10), -100)))
    assert loss.item() == 0.0 and loss.requires_grad


# ----------------------------------------------------------------------------------------------------
# MSM

@pytest.mark.parametrize("combined", [False, True])
def test_msm_parity_and_masked_only(combined):
    torch.manual_seed(0)
    D, G, V = 16, 2, 12
    head = MSMHead(D, groups=G, vars=V, combined=combined)
    x = torch.randn(2, 30, D)
    ids = torch.randint(0, V, (2, 30, G))
    frame_mask = torch.zeros(2, 30, dtype=torch.bool)
    frame_mask[0, 3:13] = frame_mask[1, 20:30] = True
    labels = torch.where(frame_mask[..., None], ids, torch.full_like(ids, -100))
    logits, targets = head(x, labels)
    M = int(frame_mask.sum())
    if combined:
        assert logits.shape == (M, V ** G) and torch.equal(targets, ids[frame_mask][:, 0] * V + ids[frame_mask][:, 1])
        naive = F.cross_entropy(head.classifier(x).flatten(0, 1), combined_index(labels, V).flatten(), ignore_index=-100)
        # Combined ids given directly are accepted too.
        assert torch.equal(head(x, combined_index(labels, V))[0], logits)
    else:
        assert logits.shape == (M * G, V) and torch.equal(targets, ids[frame_mask].flatten())
        naive = F.cross_entropy(head.classifier(x).view(2, 30, G, V).flatten(0, 2), labels.flatten(), ignore_index=-100)
    assert torch.allclose(masked_unit_loss(logits, targets), naive, rtol=1e-6)

    base = _loss_and_grads(head, x, labels)
    y = x.clone()
    y[0, 20] += 3.0                               # unmasked frame
    y[1, 0] -= 3.0
    _assert_same(base, _loss_and_grads(head, y, labels))
    y[0, 5] += 3.0                                # masked frame
    assert not torch.equal(base[0], _loss_and_grads(head, y, labels)[0])


def test_msm_label_errors():
    head = MSMHead(8, groups=2, vars=10)
    with pytest.raises(ValueError, match="groups"):
        head(torch.randn(1, 5, 8), torch.zeros(1, 5, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="per-group"):
        head(torch.randn(1, 5, 8), torch.zeros(1, 5, dtype=torch.long))


def test_heads_refuse_labels_of_another_length():
    """Features and labels must cover the same positions: a mismatch is an error, never a silent crop."""
    with pytest.raises(ValueError):
        MLMHead(8, 11)(torch.randn(2, 5, 8), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError):
        MSMHead(8, groups=2, vars=5)(torch.randn(2, 6, 8), torch.zeros(2, 4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="embedding_weight has shape"):
        MLMHead(8, 11, embedding_weight=torch.nn.Parameter(torch.randn(8, 11)))   # [D, V], transposed


def test_msm_keeps_a_frame_with_any_group_masked():
    """Per-group MSM: a frame with one group's id and the other ignored still counts for that group
    (frames 0, 1 and 3 selected; frame 2 has no target)."""
    h = MSMHead(8, groups=2, vars=5)
    x = torch.randn(1, 4, 8)
    logits, t = h(x, torch.tensor([[[1, 2], [-100, 3], [-100, -100], [4, 0]]]))
    assert t.tolist() == [1, 2, -100, 3, 4, 0] and logits.shape == (6, 5)
