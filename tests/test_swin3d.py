"""model/swin3d.py: inflation parity with transformers' image Swin, torchvision swin3d parity, shift masks, masking,
window clipping and loading errors (tiny random models, CPU)."""
import json
import math
import os
import re

import pytest
import torch
from common import assert_attention_dropout_only_in_training, assert_same_function
from safetensors.torch import load_file, save_file
from transformers import SwinConfig as HFSwinConfig
from transformers import SwinModel

from model.swin3d import (SWIN_B_VIDEO, SWIN_T_VIDEO, SwinBlock3D, SwinConfig, VideoSwin, config_from_hf,
                          config_from_swin3d, convert_torchvision_state_dict, drop_path, get_window_size,
                          inflate_image_swin, load_video_swin, save_video_swin,
                          shift_attention_mask, swin3d_config, torchvision_state_dict, window_partition)

TINY = SwinConfig(embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=(2, 4, 4), drop_path_rate=0.0)


def save_hf_swin(path, seed=0):
    """A random HF image Swin (64 px, patch 4, window 4, 2 stages) with non-trivial norms and bias tables."""
    torch.manual_seed(seed)
    hf = SwinModel(HFSwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                                window_size=4)).eval()
    with torch.no_grad():
        for p in hf.parameters():  # bias tables start at zero and norms at 1/0: perturb everything
            p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(path, safe_serialization=True)
    return hf


def to_torchvision_names(model):
    """A torchvision swin3d file of our model: its names and index buffers (`torchvision_state_dict`), a
    400-class head, no mask_token (torchvision has none)."""
    out = {k: v for k, v in torchvision_state_dict(model).items() if k != "mask_token"}
    out["head.weight"], out["head.bias"] = torch.zeros(400, model.hidden_size), torch.zeros(400)
    return {k: v.contiguous().clone() for k, v in out.items()}


def save_swin3d_folder(path, sd, cfg):
    os.makedirs(path, exist_ok=True)
    save_file(sd, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "swin3d", "embed_dim": cfg.embed_dim, "depths": list(cfg.depths),
                   "num_heads": list(cfg.num_heads), "window_size": list(cfg.window_size),
                   "patch_size": list(cfg.patch_size)}, f)


# 1. Inflation: on a static video every temporal position equals the image model.

@pytest.mark.parametrize("frames, temporal_window", [(4, 8), (8, 2)])
def test_inflated_matches_hf_image_swin_on_static_video(tmp_path, frames, temporal_window):
    # (4, 8): the window is clipped to the 2 temporal tokens; (8, 2): 4 temporal tokens in windows of 2, shifted by 1
    # in odd blocks. No temporal padding in either, so each query sees equal copies of its image keys: exact.
    hf = save_hf_swin(tmp_path)
    model = inflate_image_swin(str(tmp_path), temporal_patch=2, temporal_window=temporal_window)
    assert not model.training and model.config.window_size == (temporal_window, 4, 4)
    assert model.config.patch_size == (2, 4, 4) and model.hidden_size == 32
    torch.manual_seed(1)
    img = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = hf(pixel_values=img).last_hidden_state.view(2, 8, 8, 32)  # 2 stages: grid H/8
        out, extra = model(img[:, :, None].expand(-1, -1, frames, -1, -1))
    assert extra is None and out.shape == (2, frames // 2, 8, 8, 32)
    torch.testing.assert_close(out, ref[:, None].expand_as(out), atol=1e-5, rtol=0)


@pytest.mark.parametrize("h, w", [(36, 44), (36, 40)])
def test_inflated_matches_hf_image_swin_on_odd_grids(tmp_path, h, w):
    """9 x 11 and 9 x 10 patch grids: windows pad the grid and patch merging pads the odd row / column at
    the bottom and right, as HF's image Swin does (a merge padded at the top or with H and W swapped differs)."""
    hf = save_hf_swin(tmp_path)
    model = inflate_image_swin(str(tmp_path), temporal_patch=2, temporal_window=8)
    torch.manual_seed(1)
    img = torch.randn(1, 3, h, w)
    gh, gw = (h // 4 + 1) // 2, (w // 4 + 1) // 2                      # the merged grid, odd sides rounded up
    with torch.no_grad():
        ref = hf(pixel_values=img).last_hidden_state.view(1, gh, gw, 32)
        out, _ = model(img[:, :, None].expand(-1, -1, 4, -1, -1))
    assert out.shape == (1, 2, gh, gw, 32)
    torch.testing.assert_close(out, ref[:, None].expand_as(out), atol=1e-5, rtol=0)


def test_hf_conversion_accepts_prefix_and_current_names(tmp_path):
    save_hf_swin(tmp_path)
    sd = load_file(os.path.join(tmp_path, "model.safetensors"))
    cfg = config_from_hf(json.load(open(os.path.join(tmp_path, "config.json"))))
    from model.swin3d import convert_hf_image_state_dict
    base = convert_hf_image_state_dict(sd, cfg)
    prefixed = convert_hf_image_state_dict({"swin." + k: v for k, v in sd.items()}, cfg)
    renames = {"attention.self.query": "attention.q_proj", "attention.self.key": "attention.k_proj",
               "attention.self.value": "attention.v_proj", "attention.output.dense": "attention.o_proj",
               "intermediate.dense": "mlp.fc1", ".output.dense": ".mlp.fc2",
               "attention.self.relative_position_bias_table":
                   "attention.relative_position_bias.relative_position_bias_table"}
    current = {}
    for k, v in sd.items():
        for a, b in renames.items():
            if a in k and not (a == ".output.dense" and "attention" in k):
                k = k.replace(a, b)
        current[k] = v
    assert set(current) != set(sd)
    for other in (prefixed, convert_hf_image_state_dict(current, cfg)):
        assert set(other) == set(base) and all(torch.equal(other[k], base[k]) for k in base)
    # inflation shapes: kernel over 2 frames (summing back to the 2D kernel), table over 2*8-1 temporal offsets
    w2d = sd["embeddings.patch_embeddings.projection.weight"]
    torch.testing.assert_close(base["patch_embed.proj.weight"].sum(2), w2d)
    assert base["stages.0.blocks.0.attn.relative_position_bias_table"].shape == (15 * 7 * 7, 2)
    assert base["stages.0.blocks.0.attn.qkv.weight"].shape == (48, 16)


# 2. torchvision swin3d_t parity (skipped where torchvision does not import).

def test_matches_torchvision_swin3d_t(tmp_path):
    try:
        from torchvision.models.video import swin3d_t
    except Exception as e:  # torchvision from PyPI does not import next to this torch build
        pytest.skip(f"torchvision unavailable: {type(e).__name__}: {e}")
    torch.manual_seed(0)
    tv = swin3d_t(weights=None).eval()
    with torch.no_grad():
        for name, p in tv.named_parameters():
            if "norm" in name or "relative_position_bias_table" in name:
                p.add_(0.1 * torch.randn_like(p))
    save_swin3d_folder(tmp_path, {k: v.contiguous().clone() for k, v in tv.state_dict().items()}, SWIN_T_VIDEO)
    model = load_video_swin(str(tmp_path))
    assert not model.training and model.hidden_size == 768
    # 224 px keeps every spatial grid (56, 28, 14, 7) >= the 7x7 window; torchvision slices the bias index of a
    # clipped window (index[:N, :N]), which is only the right offset when time alone is clipped (here 2 < 8).
    x = torch.randn(1, 3, 4, 224, 224)
    with torch.no_grad():
        ref = tv.norm(tv.features(tv.patch_embed(x)))
        out, _ = model(x)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_load_video_swin_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = VideoSwin(TINY).eval()
    save_swin3d_folder(tmp_path, to_torchvision_names(model), TINY)
    loaded = load_video_swin(str(tmp_path))
    x = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], model(x)[0], atol=0, rtol=0)


# 3. Shifted windows.

@pytest.mark.parametrize("grid, window, shift", [((4, 4, 4), (2, 2, 2), (1, 1, 1)), ((2, 6, 4), (2, 3, 4), (0, 1, 2))])
def test_shift_mask_blocks_exactly_pairs_from_different_regions(grid, window, shift):
    mask = shift_attention_mask(grid, window, shift, "cpu")  # [nW, N, N]
    # original (unrolled) coordinate of every token of every rolled window
    coords = torch.stack(torch.meshgrid(*[torch.arange(L) for L in grid], indexing="ij"), -1)  # [T, H, W, 3]
    rolled = torch.roll(coords, shifts=[-s for s in shift], dims=(0, 1, 2))
    win = window_partition(rolled[None].float(), window).long()  # [nW, N, 3]
    # Without the wrap-around, the shifted partition puts coordinate x of an axis into window floor((x - s) / w).
    w_t = torch.tensor(window)
    s_t = torch.tensor(shift)
    ids = torch.div(win - s_t, w_t, rounding_mode="floor")
    same = (ids[:, :, None, :] == ids[:, None, :, :]).all(-1)
    assert torch.equal(mask == 0, same) and torch.all(mask[~same] == -100.0)


def naive_block(block, x):
    """The block by definition: each token attends to the tokens of its shifted window in the unrolled grid;
    a grid that is not a whole number of windows is zero-padded at the end after norm1 (Video Swin), the
    padding attends and is attended to like any token, and is cropped from the output."""
    B, T, H, W, C = x.shape
    window, shift = get_window_size((T, H, W), block.window_size, block.shift_size)
    pad = [(w - L % w) % w for L, w in zip((T, H, W), window)]
    y = torch.nn.functional.pad(block.norm1(x), (0, 0, 0, pad[2], 0, pad[1], 0, pad[0]))
    Tp, Hp, Wp = y.shape[1:4]
    coords = torch.stack(torch.meshgrid(*[torch.arange(L) for L in (Tp, Hp, Wp)], indexing="ij"), -1).view(-1, 3)
    ids = torch.div(coords - torch.tensor(shift), torch.tensor(window), rounding_mode="floor")
    allowed = (ids[:, None] == ids[None]).all(-1)  # [L, L]
    rel = coords[:, None] - coords[None] + torch.tensor(block.window_size) - 1
    wt, wh, ww = block.window_size
    index = (rel[..., 0] * (2 * wh - 1) + rel[..., 1]) * (2 * ww - 1) + rel[..., 2]
    index = torch.where(allowed, index, 0)  # pairs outside one window are masked below; any valid row will do
    heads = block.attn.num_heads
    y = y.reshape(B, -1, C)
    q, k, v = block.attn.qkv(y).view(B, -1, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-1, -2) / math.sqrt(C // heads)
    logits = logits + block.attn.relative_position_bias_table[index].permute(2, 0, 1)
    attn = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
    x = x + block.attn.proj((attn @ v).transpose(1, 2).reshape(B, Tp, Hp, Wp, C))[:, :T, :H, :W]
    return x + block.mlp(block.norm2(x))


@pytest.mark.parametrize("shifted", [False, True])
@pytest.mark.parametrize("grid,window", [((4, 4, 4), (2, 2, 2)), ((3, 5, 6), (2, 4, 4))])  # the second is padded
def test_block_matches_naive_window_attention(shifted, grid, window):
    torch.manual_seed(0)
    cfg = SwinConfig(embed_dim=8, window_size=window, drop_path_rate=0.0)
    block = SwinBlock3D(8, 2, cfg, shift=shifted, drop_path_prob=0.0).eval()
    with torch.no_grad():
        block.attn.relative_position_bias_table.normal_()
        block.norm1.bias.normal_()  # padding comes after norm1: its bias must not reach the padded tokens
        x = torch.randn(2, *grid, 8)
        torch.testing.assert_close(block(x), naive_block(block, x), atol=1e-5, rtol=1e-5)


# 4. patch_mask.

def test_patch_mask_uses_mask_token():
    torch.manual_seed(0)
    model = VideoSwin(TINY).eval()
    all_masked = torch.ones(2, 2, 8, 8, dtype=torch.bool)
    a, _ = model(torch.randn(2, 3, 4, 32, 32), all_masked)
    b, _ = model(torch.randn(2, 3, 4, 32, 32), all_masked)
    torch.testing.assert_close(a, b, atol=0, rtol=0)  # nothing of the video survives
    a.sum().backward()
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0
    assert model.patch_embed.proj.weight.grad is None or model.patch_embed.proj.weight.grad.abs().sum() == 0
    # a partial mask changes the output only through the masked patches; an all-False mask is a no-op
    x = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        none, _ = model(x)
        torch.testing.assert_close(model(x, torch.zeros(1, 2, 8, 8, dtype=torch.bool))[0], none, atol=0, rtol=0)
        mask = torch.zeros(1, 2, 8, 8, dtype=torch.bool)
        mask[0, :, :3, :3] = True
        assert not torch.allclose(model(x, mask)[0], none)
    with pytest.raises(ValueError, match="patch_mask"):
        model(x, torch.zeros(1, 4, 8, 8, dtype=torch.bool))


# 5. Window clipping and padding.

def test_window_clipped_to_small_input_matches_clipped_config():
    torch.manual_seed(0)
    big = VideoSwin(SwinConfig(embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=(8, 7, 7),
                               drop_path_rate=0.0)).eval()
    x = torch.randn(1, 3, 4, 20, 20)  # grid (2, 5, 5), then (2, 3, 3): smaller than 8x7x7 along every axis
    small_cfg = SwinConfig(embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=(2, 5, 5), drop_path_rate=0.0)
    small = VideoSwin(small_cfg).eval()
    # same weights; each bias table entry moved to the same (dt, dh, dw) offset of the smaller table
    sd = big.state_dict()
    rel = torch.stack(torch.meshgrid(*[torch.arange(-(w - 1), w) for w in small_cfg.window_size], indexing="ij"), -1)
    big_rows = ((rel[..., 0] + 7) * 13 + rel[..., 1] + 6) * 13 + rel[..., 2] + 6
    for k in sd:
        if k.endswith("relative_position_bias_table"):
            sd[k] = sd[k][big_rows.flatten()]
    small.load_state_dict(sd)
    with torch.no_grad():
        out, _ = big(x)
        torch.testing.assert_close(out, small(x)[0], atol=1e-6, rtol=0)
    assert out.shape == (1, 2, 3, 3, 32)
    assert get_window_size((2, 5, 9), (8, 7, 7), (4, 3, 3)) == ((2, 5, 7), (0, 0, 3))


def test_padding_to_window_and_patch_multiples():
    torch.manual_seed(0)
    model = VideoSwin(TINY).eval()
    with torch.no_grad():
        out, _ = model(torch.randn(1, 3, 6, 37, 45))  # grid (3, 10, 12): padded to windows of (2, 4, 4)
    assert out.shape == (1, 3, 5, 6, 32) and torch.isfinite(out).all()


def test_presets():
    assert VideoSwin.__init__.__defaults__[0] is SWIN_B_VIDEO
    assert (SWIN_B_VIDEO.embed_dim, SWIN_B_VIDEO.depths, SWIN_B_VIDEO.num_heads) == (128, (2, 2, 18, 2), (4, 8, 16, 32))
    assert (SWIN_T_VIDEO.embed_dim, SWIN_T_VIDEO.depths, SWIN_T_VIDEO.num_heads) == (96, (2, 2, 6, 2), (3, 6, 12, 24))
    assert SWIN_B_VIDEO.window_size == (8, 7, 7) and SWIN_B_VIDEO.patch_size == (2, 4, 4)


# 6. Loading errors.

def test_loading_errors_name_the_key(tmp_path):
    torch.manual_seed(0)
    sd = to_torchvision_names(VideoSwin(TINY))
    missing = dict(sd)
    del missing["features.0.1.norm2.weight"]
    save_swin3d_folder(tmp_path / "missing", missing, TINY)
    named = re.escape(str(tmp_path / "missing")) + r": missing tensor\(s\) \[.*stages\.0\.blocks\.1\.norm2\.weight"
    with pytest.raises(KeyError, match=named):
        load_video_swin(str(tmp_path / "missing"))
    wrong = dict(sd)
    wrong["features.1.reduction.weight"] = torch.zeros(32, 32)
    save_swin3d_folder(tmp_path / "wrong", wrong, TINY)
    named = (re.escape(str(tmp_path / "wrong")) +
             r": tensor 'stages\.0\.downsample\.reduction\.weight' has shape \(32, 32\)")
    with pytest.raises(ValueError, match=named):
        load_video_swin(str(tmp_path / "wrong"))
    # HF: a missing q/k/v is named by its checkpoint key
    save_hf_swin(tmp_path / "hf")
    hf_sd = load_file(os.path.join(tmp_path / "hf", "model.safetensors"))
    del hf_sd["encoder.layers.1.blocks.0.attention.self.key.weight"]
    save_file(hf_sd, os.path.join(tmp_path / "hf", "model.safetensors"))
    with pytest.raises(KeyError, match=r"layers\.1\.blocks\.0\.attention\.self\.query\.weight"):
        inflate_image_swin(str(tmp_path / "hf"))
    save_swin3d_folder(tmp_path / "bad", sd, TINY)
    with open(tmp_path / "bad" / "config.json", "w") as f:
        json.dump({"model_type": "swin"}, f)
    with pytest.raises(ValueError, match="swin3d"):
        load_video_swin(str(tmp_path / "bad"))


def test_convert_torchvision_names():
    sd = {"features.0.1.mlp.3.weight": 0, "features.3.reduction.weight": 1, "features.4.0.attn.qkv.bias": 2,
          "features.2.0.attn.relative_position_index": 3, "patch_embed.proj.weight": 4, "norm.bias": 5,
          "head.weight": 6}
    assert convert_torchvision_state_dict(sd) == {
        "stages.0.blocks.1.mlp.fc2.weight": 0, "stages.1.downsample.reduction.weight": 1,
        "stages.2.blocks.0.attn.qkv.bias": 2, "patch_embed.proj.weight": 4, "norm.bias": 5, "head.weight": 6}


def test_patch_embedding_is_the_conv3d():
    """The patch embedding as a linear map of gathered patches equals Conv3d(kernel = stride = patch) ->
    channels-last -> LayerNorm, values and gradients, also where the input is right-padded to whole patches."""
    import torch.nn.functional as F

    from model.swin3d import PatchEmbed3D
    torch.manual_seed(0)
    embed = PatchEmbed3D(TINY)
    with torch.no_grad():
        embed.proj.bias.normal_()
    for shape in ((2, 3, 4, 16, 12), (1, 3, 5, 18, 13)):
        video = torch.randn(shape, requires_grad=True)
        y = embed(video)
        pad = [(p - s % p) % p for s, p in zip(shape[2:], embed.patch_size)]
        ref = embed.proj(F.pad(video, (0, pad[2], 0, pad[1], 0, pad[0]))).permute(0, 2, 3, 4, 1)
        assert_same_function(y, embed.norm(ref), [video] + list(embed.parameters()), grad_atol=1e-5)


def test_attention_dropout_acts_in_training_only():
    """Attention-probability dropout alone (no hidden dropout, no stochastic depth), in both the plain and
    the shifted-window blocks: in training it changes the output, in eval the network is the one without
    dropout."""
    torch.manual_seed(0)
    model = VideoSwin(SwinConfig(embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=(2, 4, 4),
                                 drop_path_rate=0.0, attention_dropout=0.5))
    x = torch.randn(2, 3, 4, 32, 32)
    assert_attention_dropout_only_in_training(model, lambda m: m(x)[0], "dropout")


def test_stochastic_depth_drops_whole_samples_and_keeps_the_expectation():
    """drop_path(x, p): each sample's branch is zeroed with probability p and the rest scaled by 1 / (1 - p),
    so its expectation is x (Huang et al. 2016); in eval mode it is the identity. 4000 samples at p = 0.3:
    the mean's std is sqrt(p / (1 - p) / 4000) = 0.010, tolerance 5 sigma."""
    torch.manual_seed(0)
    x = torch.ones(4000, 2, 3, 3, 4)
    y = drop_path(x, 0.3, True)
    per_sample = y.flatten(1)
    assert (per_sample == per_sample[:, :1]).all()                      # whole samples, one factor each
    assert per_sample[:, 0].unique().tolist() == [0.0, pytest.approx(1 / 0.7)]
    assert abs(y.mean().item() - 1.0) < 0.05
    assert drop_path(x, 0.3, False) is x


# 7. Writing our VideoSwin in the swin3d layout (model.save_encoder("video-swin", ...)), and telling layouts apart.

TINY_PRESET = SwinConfig(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), window_size=(2, 4, 4),
                         drop_path_rate=0.0)  # icode.preset("tiny").vision


def torchvision_index(window):
    """torchvision's ShiftedWindowAttention3d.define_relative_position_index, written out: [N, N] int64."""
    coords = torch.stack(torch.meshgrid(*[torch.arange(w) for w in window], indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    rel = rel + torch.tensor(window) - 1
    return rel[..., 0] * (2 * window[1] - 1) * (2 * window[2] - 1) + rel[..., 1] * (2 * window[2] - 1) + rel[..., 2]


@pytest.mark.parametrize("cfg", [TINY_PRESET, SwinConfig(
    in_chans=1, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=(2, 3, 4), patch_size=(1, 4, 4),
    mlp_ratio=2.0, qkv_bias=False, layer_norm_eps=1e-6, drop_path_rate=0.2, hidden_dropout=0.1,
    attention_dropout=0.1)], ids=["tiny-preset", "options"])
def test_save_video_swin_loads_back(tmp_path, cfg):
    """Written with save_encoder("video-swin"), our VideoSwin loads back through load_encoder with the same config
    (every field), tensors (mask_token included) and outputs, with and without a patch mask. The file holds
    torchvision's names and index buffers (the test's own converter) plus mask_token, and no head."""
    from model import load_encoder, save_encoder
    torch.manual_seed(0)
    model = VideoSwin(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # norms at 1/0, bias tables near 0, the mask token small: perturb everything
            p.add_(0.1 * torch.randn_like(p))
    save_encoder("video-swin", model, str(tmp_path))
    stored = load_file(os.path.join(tmp_path, "model.safetensors"))
    ours = model.state_dict()
    n_blocks = {f"features.{2 * i}.{j}.attn.relative_position_index" for i, d in enumerate(cfg.depths) for j in range(d)}
    assert len(stored) == len(ours) + len(n_blocks) and n_blocks <= set(stored)
    for tv, k in (("features.0.0.mlp.0.weight", "stages.0.blocks.0.mlp.fc1.weight"),   # torchvision's names, by hand
                  ("features.0.0.mlp.3.bias", "stages.0.blocks.0.mlp.fc2.bias"),
                  ("features.1.reduction.weight", "stages.0.downsample.reduction.weight"),
                  ("features.2.0.attn.qkv.weight", "stages.1.blocks.0.attn.qkv.weight"),
                  ("patch_embed.proj.weight", "patch_embed.proj.weight"), ("norm.bias", "norm.bias"),
                  ("mask_token", "mask_token")):
        assert torch.equal(stored[tv], ours[k]), tv
    idx = [k for k in stored if k.endswith("relative_position_index")]
    assert len(idx) == sum(cfg.depths) and all(torch.equal(stored[k], torchvision_index(cfg.window_size)) for k in idx)
    assert stored["features.0.0.attn.relative_position_index"].dtype == torch.int64
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["model_type"] == "swin3d"
    loaded = load_encoder("video-swin", str(tmp_path))
    assert loaded.config == cfg and not loaded.training
    ours_sd, back = model.state_dict(), loaded.state_dict()
    assert set(back) == set(ours_sd) and all(torch.equal(back[k], ours_sd[k]) for k in ours_sd)
    assert torch.equal(loaded.mask_token, model.mask_token) and not torch.equal(loaded.mask_token, VideoSwin(cfg).mask_token)
    torch.manual_seed(1)
    video = torch.randn(2, cfg.in_chans, 4, 64, 64)
    mask = torch.rand(2, 4 // cfg.patch_size[0], 16, 16) < 0.4
    with torch.no_grad():
        for args in ((video,), (video, mask)):
            assert torch.equal(loaded(*args)[0], model(*args)[0])
        assert not torch.allclose(model(video, mask)[0], model(video)[0])


def test_swin3d_config_round_trips_every_field():
    """Each SwinConfig field, set off its default, survives swin3d_config -> JSON -> config_from_swin3d; a
    torchvision-style config.json with only the required fields takes the defaults."""
    import dataclasses
    changed = SwinConfig(in_chans=4, patch_size=(1, 2, 2), embed_dim=24, depths=(1, 3), num_heads=(3, 6),
                         window_size=(4, 5, 6), mlp_ratio=3.0, qkv_bias=False, layer_norm_eps=1e-6, drop_path_rate=0.3,
                         hidden_dropout=0.2, attention_dropout=0.05)
    defaults = SwinConfig()
    assert all(getattr(changed, f.name) != getattr(defaults, f.name) for f in dataclasses.fields(SwinConfig))
    assert config_from_swin3d(json.loads(json.dumps(swin3d_config(changed)))) == changed
    required = {"model_type": "swin3d", "embed_dim": 128, "depths": [2, 2, 18, 2], "num_heads": [4, 8, 16, 32],
                "window_size": [8, 7, 7], "patch_size": [2, 4, 4]}
    assert config_from_swin3d(required) == defaults


def test_torchvision_state_dict_inverts_the_loader_names():
    torch.manual_seed(0)
    model = VideoSwin(TINY)
    sd = torchvision_state_dict(model)
    assert "features.2.1.mlp.3.bias" in sd and "features.1.reduction.weight" in sd and "mask_token" in sd
    back = convert_torchvision_state_dict(sd)
    assert set(back) == set(model.state_dict())
    with pytest.raises(TypeError, match="writes a VideoSwin, got a Linear"):
        save_video_swin(torch.nn.Linear(2, 2), "unused")


def test_save_encoder_kinds(tmp_path):
    """save_encoder writes the kinds load_encoder reads, except the image Swin ("swin"), which it names."""
    from model import save_encoder
    with pytest.raises(ValueError, match=r"\('deberta-v3', 'wavlm', 'hubert', 'video-swin'\).*'swin'.*image Swin"):
        save_encoder("swin", VideoSwin(TINY), str(tmp_path))
    with pytest.raises(ValueError, match=r"to write an encoder, got 'bert'"):
        save_encoder("bert", VideoSwin(TINY), str(tmp_path))
    assert not os.listdir(tmp_path)


def test_vision_kind_from_model_type(tmp_path):
    """vision_kind reads config.json's model_type: "swin" (an image Swin: inflate) or "swin3d" (a Video Swin);
    anything else names the file and the value."""
    from model import vision_kind
    save_hf_swin(tmp_path / "image")
    save_video_swin(VideoSwin(TINY), str(tmp_path / "video"))
    assert vision_kind(str(tmp_path / "image")) == "swin"
    assert vision_kind(str(tmp_path / "video")) == "video-swin"
    os.makedirs(tmp_path / "other")
    for content, said in (({"model_type": "vit"}, "model_type 'vit' is not a vision checkpoint"),
                          ({}, "model_type None is not a vision checkpoint"), ([1, 2], "not a JSON object")):
        with open(tmp_path / "other" / "config.json", "w") as f:
            json.dump(content, f)
        with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'other' / 'config.json'}: {said}")):
            vision_kind(str(tmp_path / "other"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        vision_kind(str(tmp_path))
