"""Masking statistics (section 4.2.1, appendix A.1) over many draws, with the tolerances stated."""
import math

import torch

from data import mask_tokens, span_mask, span_mask_batch, tube_mask, tube_to_patch_mask
from training.static_rows import mask_tokens_max, tube_mask_max


def test_mask_tokens_ratio_and_80_10_10():
    g = torch.Generator().manual_seed(0)
    B, L, V, MASK = 64, 512, 1000, 4
    ids = torch.randint(10, V, (B, L), generator=g)
    special = torch.zeros(B, L, dtype=torch.bool)
    special[:, 0] = special[:, -1] = True            # [CLS], [SEP]
    special[:, 400:] = True                          # padding
    inputs, labels = mask_tokens(ids, special, MASK, V, ratio=0.3, generator=g)
    selected = labels != -100
    eligible = (~special).sum().item()
    n = selected.sum().item()
    # Binomial(eligible, 0.3): std ~ sqrt(p(1-p)/n) ~ 0.0013 at n ~ 25k; allow 5 sigma.
    assert abs(n / eligible - 0.3) < 0.007
    assert not (selected & special).any(), "special or padding tokens were selected"
    assert torch.equal(labels[selected], ids[selected])
    assert torch.equal(inputs[~selected], ids[~selected]), "unselected tokens changed"
    to_mask = (inputs[selected] == MASK).float().mean().item()
    kept = (inputs[selected] == ids[selected]).float().mean().item()
    rand = 1 - to_mask - kept
    # 80/10/10 of ~7.6k tokens; random ids coincide with the original 1/990 of the time.
    assert abs(to_mask - 0.8) < 0.025 and abs(kept - 0.1) < 0.02 and abs(rand - 0.1) < 0.02
    # the random 10% are uniform ids over the vocabulary: mean (V - 1) / 2 = 499.5, std of the mean of ~770
    # draws ~10.4 (5 sigma: 52), and hundreds of distinct ids (not one replacement id for all)
    replaced = inputs[selected][(inputs[selected] != MASK) & (inputs[selected] != ids[selected])].float()
    assert abs(replaced.mean().item() - (V - 1) / 2) < 52 and replaced.unique().numel() > 400


def test_mask_tokens_random_ids_cover_the_whole_vocabulary():
    """A 5-id vocabulary, every token selected and all ids 0: the random 10% are uniform over all of [0, 5),
    the last id included (each ~2,000 of 100,000 positions: std ~44; 0 also holds the kept 10%)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.zeros(1, 100_000, dtype=torch.long)
    inputs, _ = mask_tokens(ids, torch.zeros_like(ids, dtype=torch.bool), 99, 5, ratio=1.0, generator=g)
    counts = torch.bincount(inputs[inputs != 99], minlength=5)
    assert counts.numel() == 5 and (counts[1:] - 2000).abs().max() < 250, counts


def test_tube_mask_exact_count_length_and_contiguity():
    g = torch.Generator().manual_seed(1)
    T, H, W = 8, 14, 14
    lengths, starts = [], []
    for _ in range(400):
        m = tube_mask(T, H, W, ratio=0.5, generator=g)
        frames = m.flatten(1).any(1)
        idx = frames.nonzero().flatten()
        t0, t1 = idx.min().item(), idx.max().item()
        assert frames[t0:t1 + 1].all(), "masked frames are not contiguous"
        lengths.append(t1 - t0 + 1)
        starts.append(t0)
        for t in idx.tolist():
            assert m[t].sum().item() == round(0.5 * H * W)            # exact 2D count
            assert torch.equal(m[t], m[t0])                           # the same 2D mask: a tube
    assert min(lengths) == math.ceil(T / 2) and max(lengths) == T   # l uniform in [T/2, T], both ends hit
    assert all(s + l <= T for s, l in zip(starts, lengths))          # no wrap-around
    # l is uniform over 5 values: each ~80 of 400 draws; allow wide bounds.
    counts = torch.bincount(torch.tensor(lengths))[4:]
    assert counts.min() > 45
    # t uniform in [0, T - l]: for l = 4 (~80 draws) each of the 5 starts ~16 times; missing one has
    # probability ~5 * 0.8^80 ~ 1e-7, and a start always at 0 (or never at the end) would fail here
    starts4 = torch.bincount(torch.tensor([s for s, l in zip(starts, lengths) if l == 4]), minlength=5)
    assert starts4.numel() == 5 and starts4.min() >= 4, starts4
    # round, not floor: a 3 x 5 grid at 50% masks round(7.5) = 8 positions per frame (Python rounds halves to even)
    m = tube_mask(4, 3, 5, ratio=0.5, generator=g)
    assert {int(m[t].sum()) for t in range(4) if m[t].any()} == {8}
    # odd frame counts: l in [ceil(5/2), 5] = [3, 5]
    ls = {tube_mask(5, 4, 4, generator=g).flatten(1).any(1).sum().item() for _ in range(200)}
    assert ls == {3, 4, 5}


def test_static_tube_masks_every_frame_alike():
    """An image (a static clip of identical frames) gets one non-empty 2D mask on all T frames, for every draw:
    no frame shows a masked cell's content (and so its target id) to the encoder."""
    g = torch.Generator().manual_seed(3)
    for T in (1, 2, 4, 8):
        for _ in range(100):
            m = tube_mask(T, 7, 7, ratio=0.5, generator=g, static=True)
            assert m[0].sum().item() == round(0.5 * 49)
            assert all(torch.equal(m[t], m[0]) for t in range(T))
    assert tube_mask_max(8, 7, 7, 0.5) == 8 * round(0.5 * 49)   # the heads' static bound still holds


def test_tube_to_patch_mask_maps_grids():
    """A patch covering frames 2t and 2t+1 is masked if either is (so no pixel of a masked token is seen).
    Several draws, so that tubes starting or ending inside a pair of frames occur (one draw whose tube is
    aligned to the pairs cannot tell "either" from "both"; half the draws are aligned, and seed 2's first
    eight all were)."""
    g = torch.Generator().manual_seed(0)
    straddling = 0
    for _ in range(8):
        m = tube_mask(8, 14, 14, generator=g)         # 224x224x8 frames: the token grid 8 x 14 x 14
        p = tube_to_patch_mask(m)                     # Video Swin patch grid T/2 x H/4 x W/4 = 4 x 56 x 56
        assert p.shape == (4, 56, 56)
        frames = m.flatten(1).any(1)                  # [8] which frames the tube covers
        straddling += int(any(frames[2 * t] != frames[2 * t + 1] for t in range(4)))
        for t in range(4):
            for i in range(0, 56, 5):
                for j in range(0, 56, 7):
                    assert p[t, i, j] == (m[2 * t, i // 4, j // 4] or m[2 * t + 1, i // 4, j // 4])
    assert straddling > 0


def test_span_mask_coverage_and_batch_lengths():
    g = torch.Generator().manual_seed(3)
    L, p, span = 2000, 0.08, 10
    cover = torch.stack([span_mask(L, p, span, g) for _ in range(50)]).float().mean().item()
    expect = 1 - (1 - p) ** span                      # ~0.566 for independent starts
    assert abs(cover - expect) < 0.02, (cover, expect)
    # starts come from the whole sequence (clipped spans), so the last frame is covered as often as a middle
    # one (fairseq's [0, L - span] would cover it only by a start at L - span: ~p * L / (L - span + 1) ~ 9%);
    # 2000 draws of L = 100: each share's std ~0.011, the difference's ~0.016
    m = torch.stack([span_mask(100, p, span, g) for _ in range(2000)]).float()
    assert abs(m[:, -1].mean() - m[:, 50].mean()) < 0.07, (m[:, -1].mean(), m[:, 50].mean())
    # start count: int(p * L + U[0,1)) distinct starts, at least one; with span 1 the mask counts them:
    # p * L = 2.5 gives 2 or 3 (mean 2.5; 4000 draws: std of the mean ~0.008), never fewer (no repeats)
    n = torch.stack([span_mask(25, 0.1, 1, g) for _ in range(4000)]).sum(1).float()
    assert set(n.tolist()) == {2.0, 3.0} and abs(n.mean().item() - 2.5) < 0.04, n.mean()
    short = span_mask(5, p, span, g)
    assert short.any()
    lengths = [30, 100, 7, 0]
    mb = span_mask_batch(lengths, max_length=120, generator=g)
    assert mb.shape == (4, 120)
    for i, n in enumerate(lengths):
        assert not mb[i, n:].any(), "padding frames were masked"
    assert mb[1, :100].any() and not mb[3].any()


def test_mask_tokens_count_per_row_is_int_ratio_e_plus_u():
    """fairseq's count: each row selects int(0.3 e + U) of its e eligible tokens, i.e. floor(0.3 e) or one
    more, with mean 0.3 e (rows of e = 25: 7 or 8, mean 7.5; 4000 rows: std of the mean ~0.008), a uniform
    subset (each eligible position's share ~0.3: 4000 draws, std ~0.007), never above mask_tokens_max."""
    g = torch.Generator().manual_seed(4)
    B, L = 4000, 32
    ids = torch.randint(10, 100, (B, L), generator=g)
    special = torch.zeros(B, L, dtype=torch.bool)
    special[:, 0] = True
    special[:, 26:] = True                           # e = 25 eligible
    _, labels = mask_tokens(ids, special, 4, 100, ratio=0.3, generator=g)
    sel = labels != -100
    n = sel.sum(1).float()
    assert set(n.tolist()) == {7.0, 8.0} and abs(n.mean().item() - 7.5) < 0.04, n.mean()
    share = sel[:, 1:26].float().mean(0)
    assert (share - 0.3).abs().max() < 0.035, share
    assert n.max() <= mask_tokens_max(L, 0.3) == 10
    # ratio 1 selects every eligible token, ratio 0 none
    assert torch.equal(mask_tokens(ids[:8], special[:8], 4, 100, 1.0, g)[1] != -100, ~special[:8])
    assert (mask_tokens(ids[:8], special[:8], 4, 100, 0.0, g)[1] == -100).all()
