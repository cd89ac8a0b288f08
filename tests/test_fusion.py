"""Fusion network (section 4.1): padding invariance, no positional embeddings, subsets, co-attention."""
import itertools

import pytest
import torch

from model.fusion import MODALITIES, FusionConfig, FusionNetwork, masked_mean

DIMS = {"video": 12, "text": 10, "audio": 14}


def make(mode, **kw):
    torch.manual_seed(0)
    cfg = FusionConfig(mode=mode, dim=16, layers=2 if mode == "merge" else 2, heads=4, dropout=0.0, **kw)
    return FusionNetwork(cfg, DIMS).eval()


def inputs(B=3):
    g = torch.Generator().manual_seed(1)
    feats = {"video": torch.randn(B, 2, 2, 2, 12, generator=g), "text": torch.randn(B, 7, 10, generator=g),
             "audio": torch.randn(B, 9, 14, generator=g)}
    valids = {"text": torch.arange(7)[None] < torch.tensor([[7], [4], [2]]),
              "audio": torch.arange(9)[None] < torch.tensor([[5], [9], [3]])}
    return feats, valids


@pytest.mark.parametrize("mode", ["merge", "co"])
def test_padding_never_influences_valid_tokens(mode):
    f = make(mode)
    feats, valids = inputs()
    out = f(feats, valids)
    feats2 = {k: v.clone() for k, v in feats.items()}
    feats2["text"][~valids["text"]] = 1e3 * torch.randn_like(feats2["text"][~valids["text"]])
    feats2["audio"][~valids["audio"]] = -5.0
    out2 = f(feats2, valids)
    for m in MODALITIES:
        v = valids.get(m)
        a, b = out[m], out2[m]
        if v is not None:
            a, b = a[v], b[v]
        assert torch.allclose(a, b, atol=1e-5), m
    # Same as running each example alone, truncated to its valid length.
    for i in range(3):
        lt, ls = valids["text"][i].sum(), valids["audio"][i].sum()
        single = f({"video": feats["video"][i:i + 1], "text": feats["text"][i:i + 1, :lt],
                    "audio": feats["audio"][i:i + 1, :ls]})
        assert torch.allclose(single["text"][0], out["text"][i, :lt], atol=1e-5)
        assert torch.allclose(single["video"][0], out["video"][i], atol=1e-5)


def test_merge_attention_is_permutation_equivariant_within_a_modality():
    """No positional embeddings in the fusion module (section 4.1): permuting one modality's tokens
    permutes its outputs the same way and leaves the other modalities' outputs unchanged."""
    f = make("merge")
    feats, _ = inputs()
    out = f(feats)
    perm = torch.randperm(7)
    feats2 = dict(feats, text=feats["text"][:, perm])
    out2 = f(feats2)
    assert torch.allclose(out2["text"], out["text"][:, perm], atol=1e-5)
    assert torch.allclose(out2["audio"], out["audio"], atol=1e-5)
    assert torch.allclose(out2["video"], out["video"], atol=1e-5)


@pytest.mark.parametrize("mode", ["merge", "co"])
def test_every_subset_runs_and_depends_on_the_others(mode):
    f = make(mode)
    feats, valids = inputs()
    alone = {m: f({m: feats[m]}, {m: valids.get(m)})[m] for m in MODALITIES}
    for k in (1, 2, 3):
        for subset in itertools.combinations(MODALITIES, k):
            out = f({m: feats[m] for m in subset}, {m: valids.get(m) for m in subset})
            assert set(out) == set(subset)
            for m in subset:
                n = feats[m].shape[1] if m != "video" else 8
                assert out[m].shape == (3, n, 16)
                assert torch.isfinite(out[m]).all()
                # with other modalities present, the output of m changes (they are fused)
                assert torch.allclose(out[m], alone[m], atol=1e-6) == (k == 1)


def test_co_attention_single_modality_is_self_attention_plus_ffn():
    f = make("co")
    feats, valids = inputs()
    x = f.proj["text"](feats["text"])
    v = valids["text"]
    for layer in f.layers:                # the reference: self-attention + FFN, no cross-attention
        x = layer.self_norm["text"](x + layer.self_attn["text"](x, key_valid=v))
        x = layer.ffn_norm["text"](x + layer.ffn["text"](x))
    out = f({"text": feats["text"]}, {"text": v})["text"]
    assert torch.allclose(out, x, atol=1e-6)


def test_merge_layer_is_pytorchs_post_ln_encoder_layer():
    """MergeLayer against torch.nn.TransformerEncoderLayer (post-LN, GELU, key padding) with the same weights."""
    layer = make("merge").layers[0]
    ref = torch.nn.TransformerEncoderLayer(16, 4, 64, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=False, layer_norm_eps=1e-5).eval()
    with torch.no_grad():
        ref.self_attn.in_proj_weight.copy_(torch.cat([layer.attn.q.weight, layer.attn.kv.weight]))
        ref.self_attn.in_proj_bias.copy_(torch.cat([layer.attn.q.bias, layer.attn.kv.bias]))
        ref.self_attn.out_proj.load_state_dict(layer.attn.out.state_dict())
        ref.linear1.load_state_dict(layer.ffn.fc1.state_dict())
        ref.linear2.load_state_dict(layer.ffn.fc2.state_dict())
        for a, b in ((ref.norm1, layer.norm1), (ref.norm2, layer.norm2)):
            a.weight.copy_(b.weight.detach().normal_())   # non-trivial affine parameters
            a.bias.copy_(b.bias.detach().normal_())
        x = torch.randn(3, 7, 16)
        valid = torch.arange(7)[None] < torch.tensor([[7], [4], [2]])
        want = ref(x, src_key_padding_mask=~valid)
        got = layer(x, valid)
    assert torch.allclose(got[valid], want[valid], atol=1e-5)


def test_co_attention_layer_with_three_modalities():
    """Fig. 1b / section 4.1 written out: X_m^self from m alone; X_m^cross with queries from X_m^self and keys /
    values from the concatenated X_o^self of the other modalities (their padding masked); then the FFN."""
    f = make("co")
    feats, valids = inputs()
    xs = {m: torch.randn(3, feats[m].shape[1:-1].numel(), 16) for m in MODALITIES}
    vs = {"video": None, **valids}
    layer = f.layers[0]
    with torch.no_grad():
        got = layer(xs, vs)
        s = {m: layer.self_norm[m](x + layer.self_attn[m](x, key_valid=vs[m])) for m, x in xs.items()}
        for m in MODALITIES:
            others = [o for o in MODALITIES if o != m]
            ctx = torch.cat([s[o] for o in others], 1)
            kv = torch.cat([vs[o] if vs[o] is not None else torch.ones(3, s[o].shape[1], dtype=torch.bool)
                            for o in others], 1)
            c = layer.cross_norm[m](s[m] + layer.cross_attn[m](s[m], ctx, key_valid=kv))
            want = layer.ffn_norm[m](c + layer.ffn[m](c))
            valid = vs[m] if vs[m] is not None else torch.ones(3, xs[m].shape[1], dtype=torch.bool)
            assert torch.allclose(got[m][valid], want[valid], atol=1e-5), m


def test_attention_matches_a_hand_written_softmax():
    f = make("merge")
    attn = f.layers[0].attn
    torch.manual_seed(4)
    x = torch.randn(2, 5, 16)
    valid = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    y = attn(x, key_valid=valid)
    q = attn.q(x).view(2, 5, 4, 4).transpose(1, 2)
    k, v = attn.kv(x).view(2, 5, 2, 4, 4).permute(2, 0, 3, 1, 4)
    s = q @ k.transpose(-1, -2) / 2.0
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    ref = attn.out((s.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 16))
    assert torch.allclose(y, ref, atol=1e-6)


def test_ffn_sharing_switch_and_param_counts():
    shared, per = make("co"), make("co", co_ffn_per_modality=True)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    ffn = sum(p.numel() for p in shared.layers[0].ffn["text"].parameters())
    assert n(per) - n(shared) == 2 * ffn * len(shared.layers)       # two extra FFNs per layer
    assert shared.layers[0].ffn["text"] is shared.layers[0].ffn["audio"]


def test_merge_input_is_the_projections_plus_the_modality_embedding():
    """Section 4.1: each modality's projected features plus its identification embedding (on every position),
    concatenated in MODALITIES order, through the shared layers."""
    f = make("merge")
    feats, valids = inputs()
    out = f(feats, valids)
    xs = [f.proj[m](feats[m].flatten(1, 3) if m == "video" else feats[m]) + f.modality_embed[i]
          for i, m in enumerate(MODALITIES)]
    x = torch.cat(xs, 1)
    valid = torch.cat([torch.ones(3, 8, dtype=torch.bool), valids["text"], valids["audio"]], 1)
    for layer in f.layers:
        x = layer(x, valid)
    want = dict(zip(MODALITIES, x.split([8, 7, 9], 1)))
    for m in MODALITIES:
        torch.testing.assert_close(out[m], want[m])
    assert f.modality_embed.abs().min() > 0               # the embeddings differ from zero (std 0.02 init)
    # any subset: each modality keeps its own embedding (its index in MODALITIES, not in the subset)
    for subset in [s for k in (1, 2) for s in itertools.combinations(MODALITIES, k)]:
        x = torch.cat([xs[MODALITIES.index(m)] for m in subset], 1)
        valid = torch.cat([torch.ones(3, 8, dtype=torch.bool) if m == "video" else valids[m] for m in subset], 1)
        for layer in f.layers:
            x = layer(x, valid)
        out = f({m: feats[m] for m in subset}, {m: valids[m] for m in subset if m in valids})
        want = dict(zip(subset, x.split([{"video": 8, "text": 7, "audio": 9}[m] for m in subset], 1)))
        for m in subset:
            torch.testing.assert_close(out[m], want[m])


@pytest.mark.parametrize("mode", ["merge", "co"])
def test_dropout_only_in_training(mode):
    """Dropout 0.5 everywhere (attention probabilities, residual branches, FFN): in eval mode the network is
    the same function as with dropout 0; in training mode it is not."""
    f = make(mode)
    f_drop = FusionNetwork(FusionConfig(**{**f.cfg.__dict__, "dropout": 0.5}), DIMS)
    f_drop.load_state_dict(f.state_dict())
    feats, valids = inputs()
    want = f(feats, valids)
    got = f_drop.eval()(feats, valids)
    for m in MODALITIES:
        torch.testing.assert_close(got[m], want[m])
    torch.manual_seed(0)
    train = f_drop.train()(feats, valids)
    assert all(not torch.allclose(train[m], want[m]) for m in MODALITIES)


@pytest.mark.parametrize("mode", ["merge", "co"])
def test_every_residual_branch_has_dropout(mode):
    """Dropout 1 in training zeroes every residual branch (attention, cross-attention, FFN), so a layer is its
    LayerNorms alone: merge norm2(norm1(x)); co ffn_norm(cross_norm(self_norm(x))) (cross only with others)."""
    f = FusionNetwork(FusionConfig(mode=mode, dim=16, layers=1, heads=4, dropout=1.0), DIMS).train()
    feats, valids = inputs()
    for subset in (MODALITIES, ("text",)):
        out = f({m: feats[m] for m in subset}, valids)
        layer = f.layers[0]
        for m in subset:
            x = f.proj[m](feats[m].flatten(1, 3) if m == "video" else feats[m])
            if mode == "merge":
                want = layer.norm2(layer.norm1(x + f.modality_embed[MODALITIES.index(m)]))
            else:
                x = layer.self_norm[m](x)
                want = layer.ffn_norm[m](layer.cross_norm[m](x) if len(subset) > 1 else x)
            torch.testing.assert_close(out[m], want)


def test_masked_mean_closed_form():
    x = torch.arange(12.0).view(1, 4, 3)
    valid = torch.tensor([[True, False, True, False]])
    assert torch.equal(masked_mean(x, valid), (x[0, 0] + x[0, 2])[None] / 2)
    assert torch.equal(masked_mean(x, None), x.mean(1))


def test_bad_inputs_raise():
    f = make("merge")
    with pytest.raises(ValueError, match="non-empty subset"):
        f({})
    with pytest.raises(ValueError, match="image"):
        f({"image": torch.randn(1, 2, 3)})
    with pytest.raises(ValueError, match="divisible"):
        FusionNetwork(FusionConfig(dim=10, heads=4), DIMS)
