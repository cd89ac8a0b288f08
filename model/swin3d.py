"""Video Swin Transformer (Liu et al. 2021b, "Video Swin Transformer"), the i-Code vision encoder.

i-Code (Yang et al. 2022, section 3) uses a video CoSwin inflated from an image CoSwin "following the procedure
in Liu et al. (2021b)"; CoSwin checkpoints are not public, so this file builds the plain Video Swin and offers two
ways to fill it: `inflate_image_swin` (an image Swin in Hugging Face layout, inflated as in Liu et al. 2021b,
section 3.3) and `load_video_swin` (a torchvision `swin3d_*` state dict). For masked vision modeling (appendix A.1)
patch features selected by `patch_mask` are replaced by a learned `mask_token` before the first stage.

Reference implementations followed: SwinTransformer/Video-Swin-Transformer (`swin_transformer.py`),
torchvision `models/video/swin_transformer.py`, transformers `models/swin/modeling_swin.py`.

Pipeline: video [B, 3, T, H, W] -> 2x4x4 patch embedding (a matrix product with the Conv3d's weights)
  + LayerNorm -> [B, T/2, H/4, W/4, C]
  -> stages of (shifted) 3D window attention blocks, 2x2 spatial patch merging between stages
  -> LayerNorm -> [B, T/2, H/32, W/32, 8C] (with 4 stages).

Differences from the references:
- When the window is clipped to a smaller input (`get_window_size`), Video Swin and torchvision look the bias up with
  `index[:N, :N]` of the full window, which is the right offset only when the time axis alone is clipped. We build
  the index of the clipped window (same table, same result in that case, correct offsets in all others).
- The shift mask uses -100 (as all three references do), not -inf, so outputs match them to float precision.
- CoSwin's convolutional embedding/projections are not implemented (i-Code's CoSwin weights were never released).
"""
import dataclasses
import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.weights import check_names_invert, load_state_strict, read_hf_folder, write_hf_folder


@dataclass
class SwinConfig:
    in_chans: int = 3                      # RGB frames
    patch_size: tuple = (2, 4, 4)          # (t, h, w) of one patch: 2 frames x 4 x 4 pixels (Liu et al. 2021b)
    embed_dim: int = 128                   # C of stage 1; doubles at every patch merging (Swin-B: 128)
    depths: tuple = (2, 2, 18, 2)          # blocks per stage (Swin-B)
    num_heads: tuple = (4, 8, 16, 32)      # attention heads per stage (head dim 32 throughout)
    window_size: tuple = (8, 7, 7)         # (t, h, w) attention window in patches; "8x7x7" in Video Swin
    mlp_ratio: float = 4.0                 # MLP hidden width = mlp_ratio * C
    qkv_bias: bool = True                  # bias on the q, k, v projections
    layer_norm_eps: float = 1e-5           # nn.LayerNorm default, as in all references
    drop_path_rate: float = 0.1            # stochastic depth, rising linearly from 0 to this over all blocks
    hidden_dropout: float = 0.0            # dropout after patch embedding, attention projection and MLP
    attention_dropout: float = 0.0         # dropout on attention probabilities


SWIN_B_VIDEO = SwinConfig(drop_path_rate=0.3)  # Video Swin-B; 0.3 is its Kinetics-400 setting
SWIN_T_VIDEO = SwinConfig(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))  # Video Swin-T


def get_window_size(grid, window, shift):
    """Clip the window to the grid along each axis, with no shift where clipped (Video Swin's `get_window_size`)."""
    window, shift = list(window), list(shift)
    for i in range(3):
        if grid[i] <= window[i]:
            window[i], shift[i] = grid[i], 0
    return tuple(window), tuple(shift)


def relative_position_index(window, table_window):
    """[N, N] row of the bias table (laid out for `table_window`) for every (query, key) pair of a `window` box."""
    coords = torch.stack(torch.meshgrid(*[torch.arange(w) for w in window], indexing="ij")).flatten(1)  # [3, N]
    rel = coords[:, :, None] - coords[:, None, :]  # [3, N, N] offsets, in (-w, w) per axis
    _, wh, ww = table_window
    return (rel[0] + table_window[0] - 1) * (2 * wh - 1) * (2 * ww - 1) + (rel[1] + wh - 1) * (2 * ww - 1) + (rel[2] + ww - 1)


def window_partition(x, window):
    """[B, T, H, W, C] (each a multiple of the window) -> [B * num_windows, Wt*Wh*Ww, C]."""
    B, T, H, W, C = x.shape
    x = x.view(B, T // window[0], window[0], H // window[1], window[1], W // window[2], window[2], C)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, math.prod(window), C)


def window_reverse(windows, window, B, T, H, W):
    """Inverse of `window_partition`."""
    x = windows.view(B, T // window[0], H // window[1], W // window[2], window[0], window[1], window[2], -1)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(B, T, H, W, -1)


def shift_attention_mask(grid, window, shift, device):
    """[num_windows, N, N] additive mask: -100 between tokens that the cyclic roll brought from different regions.

    Along each axis the rolled grid has three regions, [0, L-w), [L-w, L-s), [L-s, L); a token's label combines
    its three region ids, and tokens of one window may attend to each other only if their labels agree.
    """
    labels = torch.zeros(grid, device=device)
    for axis, (L, w, s) in enumerate(zip(grid, window, shift)):
        idx = torch.arange(L, device=device)
        region = (idx >= L - w).float() + ((idx >= L - s).float() if s > 0 else 0)
        labels = labels * 3 + region.view([L if a == axis else 1 for a in range(3)])
    labels = window_partition(labels[None, ..., None], window).squeeze(-1)  # [num_windows, N]
    return (labels[:, :, None] != labels[:, None, :]).float() * -100.0


def drop_path(x, p, training):
    """Stochastic depth: zero the residual branch of whole samples with probability p (rescaling the rest)."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - p)
    return x * keep.div_(1 - p)  # one pass over x: the [B, 1, 1, 1, 1] factor is scaled first


def pad_end(x, pad):
    """F.pad (zeros at the end of axes, F.pad's order), but without a copy when there is nothing to pad."""
    return F.pad(x, pad) if any(pad) else x


class WindowAttention3D(nn.Module):
    """Multi-head self-attention inside 3D windows, with a learned relative position bias per (dt, dh, dw)."""

    def __init__(self, dim, num_heads, window_size, cfg):
        super().__init__()
        self.num_heads, self.window_size, self.dropout = num_heads, tuple(window_size), cfg.attention_dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=cfg.qkv_bias)  # fused q, k, v (torchvision / Video Swin layout)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(cfg.hidden_dropout)
        wt, wh, ww = self.window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wt - 1) * (2 * wh - 1) * (2 * ww - 1), num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(self.window_size, self.window_size),
                             persistent=False)  # determined by window_size, so not stored in checkpoints

    def forward(self, x, window, mask=None):
        """x [B * nW, N, C] windows of size `window`; mask [nW, N, N] additive or None -> [B * nW, N, C]."""
        BW, N, C = x.shape
        index = (self.relative_position_index if tuple(window) == self.window_size
                 else relative_position_index(window, self.window_size).to(x.device))
        h = self.num_heads
        # [h, N, N], broadcast over windows. Contiguous: CUDA's fused SDPA kernels need the mask's last dimension
        # at stride 1 (the permuted gather has stride h) and otherwise fall back to the unfused math kernel.
        bias = self.relative_position_bias_table[index].permute(2, 0, 1).contiguous()
        q, k, v = self.qkv(x).view(BW, N, 3, h, C // h).permute(2, 0, 3, 1, 4)  # [BW, h, N, d]
        if mask is not None:
            # The shift mask differs per window. SDPA's fused kernels take 4-D inputs only (a 5-D [B, nW, h, N, d]
            # falls back to the unfused math kernel), so fold the windows into the head axis: q [B, nW*h, N, d]
            # against one [nW*h, N, N] bias that broadcasts over the batch (a copy of q, k, v, not of the bias).
            nW = mask.shape[0]
            q, k, v = (t.reshape(BW // nW, nW * h, N, -1) for t in (q, k, v))
            bias = (bias + mask[:, None]).reshape(nW * h, N, N)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype),
                                             dropout_p=self.dropout if self.training else 0.0)
        out = out.reshape(BW, h, N, -1).transpose(1, 2).reshape(BW, N, C)
        return self.proj_drop(self.proj(out))


class Mlp(nn.Module):
    def __init__(self, dim, hidden, dropout):
        super().__init__()
        self.fc1, self.fc2, self.drop = nn.Linear(dim, hidden), nn.Linear(hidden, dim), nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class SwinBlock3D(nn.Module):
    """Pre-LN block: x + W-MSA(LN(x)) (shifted by window//2 when `shift`), then x + MLP(LN(x))."""

    def __init__(self, dim, num_heads, cfg, shift, drop_path_prob):
        super().__init__()
        self.window_size = tuple(cfg.window_size)
        self.shift_size = tuple(w // 2 for w in cfg.window_size) if shift else (0, 0, 0)
        self.drop_path = drop_path_prob
        self.norm1 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.attn = WindowAttention3D(dim, num_heads, cfg.window_size, cfg)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio), cfg.hidden_dropout)

    def forward(self, x):  # [B, T, H, W, C]
        B, T, H, W, C = x.shape
        window, shift = get_window_size((T, H, W), self.window_size, self.shift_size)
        y = self.norm1(x)
        pad = [(w - s % w) % w for s, w in zip((T, H, W), window)]  # zero-pad (after the norm) to whole windows
        y = pad_end(y, (0, 0, 0, pad[2], 0, pad[1], 0, pad[0]))
        grid = y.shape[1:4]
        mask = None
        if any(shift):
            y = torch.roll(y, shifts=[-s for s in shift], dims=(1, 2, 3))
            mask = shift_attention_mask(grid, window, shift, y.device)
        y = self.attn(window_partition(y, window), window, mask)
        y = window_reverse(y, window, B, *grid)
        if any(shift):
            y = torch.roll(y, shifts=shift, dims=(1, 2, 3))
        x = x + drop_path(y[:, :T, :H, :W], self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class PatchMerging(nn.Module):
    """2x2 spatial merge: [B, T, H, W, C] -> [B, T, H/2, W/2, 2C]; no temporal merging.

    The concat order (h, w) = (0,0), (1,0), (0,1), (1,1) is that of Swin, Video Swin, torchvision and HF's
    SwinPatchMerging (`for col in range(2) for row in range(2)`), so all their `reduction` weights load unchanged.
    """

    def __init__(self, dim, eps):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim, eps=eps)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        H, W = x.shape[2:4]
        x = pad_end(x, (0, 0, 0, W % 2, 0, H % 2))
        x = torch.cat([x[:, :, 0::2, 0::2], x[:, :, 1::2, 0::2], x[:, :, 0::2, 1::2], x[:, :, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class PatchEmbed3D(nn.Module):
    """Conv3d with kernel = stride = patch, then LayerNorm: [B, 3, T, H, W] -> [B, T/2, H/4, W/4, C].

    A convolution whose kernel equals its stride is a linear map of each patch's pixels (ViT's patch
    embedding): the patches are gathered into rows [B, T', H', W', 3 * 2 * 4 * 4] and multiplied by the
    kernel flattened to [C, 96], giving the channels-last grid the LayerNorm and the blocks read, with no
    3-channel convolution and no transpose after it. Weights keep the Conv3d's shape and name (`proj`).
    """

    def __init__(self, cfg):
        super().__init__()
        self.patch_size = tuple(cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_chans, cfg.embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)

    def forward(self, video):
        pad = [(p - s % p) % p for s, p in zip(video.shape[2:], self.patch_size)]  # right-pad to whole patches
        video = pad_end(video, (0, pad[2], 0, pad[1], 0, pad[0]))
        B, c, T, H, W = video.shape
        (pt, ph, pw), w = self.patch_size, self.proj.weight                   # w: [C, 3, pt, ph, pw]
        patches = (video.reshape(B, c, T // pt, pt, H // ph, ph, W // pw, pw)
                   .permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4))               # [B, T', H', W', 3 * pt * ph * pw]
        return self.norm(F.linear(patches, w.flatten(1), self.proj.bias))     # [B, T', H', W', C]


class SwinStage(nn.Module):
    def __init__(self, dim, depth, num_heads, cfg, drop_paths, downsample):
        super().__init__()
        self.blocks = nn.ModuleList(SwinBlock3D(dim, num_heads, cfg, shift=j % 2 == 1, drop_path_prob=drop_paths[j])
                                    for j in range(depth))
        self.downsample = PatchMerging(dim, cfg.layer_norm_eps) if downsample else None

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class VideoSwin(nn.Module):
    """`forward(video [B, 3, T, H, W], patch_mask [B, T/2, H/4, W/4] bool or None) -> (hidden [B, T_v, H_v, W_v, C], None)`."""

    def __init__(self, config=SWIN_B_VIDEO):
        super().__init__()
        self.config = cfg = config
        n = len(cfg.depths)
        self.hidden_size = cfg.embed_dim * 2 ** (n - 1)
        self.patch_embed = PatchEmbed3D(cfg)
        self.mask_token = nn.Parameter(torch.zeros(cfg.embed_dim))  # the learnable mask embedding (appendix A.1)
        self.pos_drop = nn.Dropout(cfg.hidden_dropout)
        n_blocks = sum(cfg.depths)  # linspace(0, rate, n_blocks), in Python so the model can be built on 'meta'
        drop_paths = [cfg.drop_path_rate * i / max(n_blocks - 1, 1) for i in range(n_blocks)]
        starts = [sum(cfg.depths[:i]) for i in range(n)]
        self.stages = nn.ModuleList(
            SwinStage(cfg.embed_dim * 2 ** i, cfg.depths[i], cfg.num_heads[i], cfg,
                      drop_paths[starts[i]:starts[i] + cfg.depths[i]], downsample=i < n - 1) for i in range(n))
        self.norm = nn.LayerNorm(self.hidden_size, eps=cfg.layer_norm_eps)
        self.apply(self._init_weights)
        nn.init.trunc_normal_(self.mask_token, std=0.02)  # as SimMIM / BEiT

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, video, patch_mask=None):
        x = self.patch_embed(video)  # [B, T/2, H/4, W/4, C]
        if patch_mask is not None:
            if patch_mask.shape != x.shape[:4]:
                raise ValueError(f"patch_mask has shape {tuple(patch_mask.shape)}, expected {tuple(x.shape[:4])}")
            x = torch.where(patch_mask[..., None], self.mask_token.to(x.dtype), x)
        x = self.pos_drop(x)
        for stage in self.stages:
            x = stage(x)
        return self.norm(x), None


# ---------------------------------------------------------------------------------------------------------------
# Loading. (a) Hugging Face image Swin, inflated; (b) torchvision swin3d state dict (and writing it).

def _pair(v):
    return tuple(v) if isinstance(v, (list, tuple)) else (v, v)


def config_from_hf(cfg, temporal_patch=2, temporal_window=8):
    """SwinConfig of the video model inflated from a Hugging Face image Swin config.json dict."""
    if cfg.get("model_type", "swin") != "swin":
        raise ValueError(f"expected an image Swin config (model_type 'swin'), got {cfg.get('model_type')!r}")
    if cfg.get("use_absolute_embeddings", False):
        raise ValueError("absolute position embeddings are not supported (Video Swin uses relative bias only)")
    if cfg.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"hidden_act {cfg['hidden_act']!r} not supported (gelu only)")
    return SwinConfig(
        in_chans=cfg.get("num_channels", 3), patch_size=(temporal_patch, *_pair(cfg.get("patch_size", 4))),
        embed_dim=cfg["embed_dim"], depths=tuple(cfg["depths"]), num_heads=tuple(cfg["num_heads"]),
        window_size=(temporal_window, *_pair(cfg.get("window_size", 7))), mlp_ratio=cfg.get("mlp_ratio", 4.0),
        qkv_bias=cfg.get("qkv_bias", True), layer_norm_eps=cfg.get("layer_norm_eps", 1e-5),
        drop_path_rate=cfg.get("drop_path_rate", 0.1), hidden_dropout=cfg.get("hidden_dropout_prob", 0.0),
        attention_dropout=cfg.get("attention_probs_dropout_prob", 0.0))


# HF block sub-names -> ours; both the names in saved checkpoints and those of current transformers' modules.
_HF_BLOCK = {"layernorm_before": "norm1", "layernorm_after": "norm2",
             "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
             "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_HF_QKV = {"attention.self.query": 0, "attention.self.key": 1, "attention.self.value": 2,
           "attention.q_proj": 0, "attention.k_proj": 1, "attention.v_proj": 2}
_HF_TABLE = ("attention.self.relative_position_bias_table", "attention.relative_position_bias.relative_position_bias_table")


def convert_hf_image_state_dict(sd, cfg):
    """HF image Swin state dict -> this module's names, inflated to the video `cfg` (a SwinConfig).

    Inflation (Liu et al. 2021b, 3.3): the 2D patch kernel is repeated over the cfg.patch_size[0] frames and divided
    by that number; the (2Wh-1)(2Ww-1) x heads bias table is repeated for each of the 2Wt-1 temporal offsets; q, k, v
    are concatenated into the fused qkv. Unknown keys (e.g. `classifier.*`) are passed through for the loader to report.
    """
    tp, wt = cfg.patch_size[0], cfg.window_size[0]
    out, qkv = {}, {}
    for key, v in sd.items():
        k = key[len("swin."):] if key.startswith("swin.") else key
        if k.endswith("relative_position_index"):
            continue
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.+)", k)
        if m:
            i, j, rest = m.groups()
            prefix = f"stages.{i}.blocks.{j}."
            if rest in _HF_TABLE:
                out[prefix + "attn.relative_position_bias_table"] = v.repeat(2 * wt - 1, 1)
                continue
            module, param = rest.rsplit(".", 1)
            if module in _HF_QKV:
                qkv.setdefault((prefix + "attn.qkv." + param), [None] * 3)[_HF_QKV[module]] = (key, v)
            elif module in _HF_BLOCK:
                out[prefix + _HF_BLOCK[module] + "." + param] = v
            else:
                out[key] = v
            continue
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.downsample\.(.+)", k)
        if m:
            out[f"stages.{m[1]}.downsample.{m[2]}"] = v
        elif k == "embeddings.patch_embeddings.projection.weight":
            out["patch_embed.proj.weight"] = v[:, :, None].repeat(1, 1, tp, 1, 1) / tp
        elif k.startswith("embeddings.patch_embeddings.projection."):
            out["patch_embed.proj." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("embeddings.norm."):
            out["patch_embed.norm." + k.rsplit(".", 1)[1]] = v
        elif k == "embeddings.mask_token":  # SwinForMaskedImageModeling: [1, 1, C]
            out["mask_token"] = v.reshape(-1)
        elif k.startswith("layernorm."):
            out["norm." + k.rsplit(".", 1)[1]] = v
        else:
            out[key] = v
    for name, parts in qkv.items():
        if any(p is None for p in parts):
            have = [p[0] for p in parts if p is not None]
            raise KeyError(f"{name}: the checkpoint has {have} but not all of query/key/value")
        out[name] = torch.cat([p[1] for p in parts], dim=0)
    return out


def inflate_image_swin(path, temporal_patch=2, temporal_window=8):
    """VideoSwin (eval mode) inflated from a Hugging Face image Swin folder (config.json + model.safetensors).

    The window is `temporal_window` x the image window. Image classification checkpoints have no mask token
    (it keeps its init); a SwinForMaskedImageModeling one brings its own.
    """
    cfg, sd = read_hf_folder(path, lambda c: config_from_hf(c, temporal_patch, temporal_window))
    model = VideoSwin(cfg)
    state = convert_hf_image_state_dict(sd, cfg)
    state.setdefault("mask_token", model.mask_token.detach().clone())
    load_state_strict(model, state, source=path, ignore_prefixes=("classifier.", "pooler.", "decoder."))
    return model.eval()


def config_from_swin3d(cfg):
    """SwinConfig from a torchvision-swin3d folder's config.json. Expected fields, e.g. for swin3d_t:

    {"model_type": "swin3d", "embed_dim": 96, "depths": [2, 2, 6, 2], "num_heads": [3, 6, 12, 24],
     "window_size": [8, 7, 7], "patch_size": [2, 4, 4]}
    optional: "in_chans" (3), "mlp_ratio" (4.0), "qkv_bias" (true), "layer_norm_eps" (1e-5), "drop_path_rate" (0.1),
    "hidden_dropout" (0.0), "attention_dropout" (0.0). `swin3d_config` writes all of them.
    """
    if cfg.get("model_type") != "swin3d":
        raise ValueError(f"expected model_type 'swin3d' in config.json, got {cfg.get('model_type')!r}")
    return SwinConfig(in_chans=cfg.get("in_chans", 3), patch_size=tuple(cfg["patch_size"]), embed_dim=cfg["embed_dim"],
                      depths=tuple(cfg["depths"]), num_heads=tuple(cfg["num_heads"]),
                      window_size=tuple(cfg["window_size"]), mlp_ratio=cfg.get("mlp_ratio", 4.0),
                      qkv_bias=cfg.get("qkv_bias", True), layer_norm_eps=cfg.get("layer_norm_eps", 1e-5),
                      drop_path_rate=cfg.get("drop_path_rate", 0.1), hidden_dropout=cfg.get("hidden_dropout", 0.0),
                      attention_dropout=cfg.get("attention_dropout", 0.0))


def swin3d_config(cfg):
    """The config.json dict of a SwinConfig in the swin3d layout: every field, tuples as lists, so that
    `config_from_swin3d(swin3d_config(c)) == c`."""
    d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}
    return {**d, "model_type": "swin3d"}


_TV_MLP = {"mlp.0.": "mlp.fc1.", "mlp.3.": "mlp.fc2."}


def convert_torchvision_state_dict(sd):
    """torchvision swin3d names -> ours: features.{2i}.{j}.* -> stages.i.blocks.j.*, features.{2i+1}.* ->
    stages.i.downsample.*, mlp.0/mlp.3 -> mlp.fc1/fc2; relative_position_index buffers are dropped (recomputed)."""
    out = {}
    for k, v in sd.items():
        if k.endswith("relative_position_index"):
            continue
        m = re.fullmatch(r"features\.(\d+)\.(\d+)\.(.+)", k)
        if m and int(m[1]) % 2 == 0:
            rest = m[3]
            for a, b in _TV_MLP.items():
                if rest.startswith(a):
                    rest = b + rest[len(a):]
            out[f"stages.{int(m[1]) // 2}.blocks.{m[2]}.{rest}"] = v
            continue
        m = re.fullmatch(r"features\.(\d+)\.((?:reduction|norm)\..+)", k)
        if m and int(m[1]) % 2 == 1:
            out[f"stages.{int(m[1]) // 2}.downsample.{m[2]}"] = v
        else:
            out[k] = v  # patch_embed.*, norm.*, head.* keep their names
    return out


def load_video_swin(path):
    """VideoSwin (eval mode) from a folder with a torchvision swin3d state dict (model.safetensors + config.json)."""
    cfg, sd = read_hf_folder(path)
    model = VideoSwin(config_from_swin3d(cfg))
    state = convert_torchvision_state_dict(sd)
    # torchvision's files have no mask token (it keeps its init); ours (`save_video_swin`) bring theirs.
    state.setdefault("mask_token", model.mask_token.detach().clone())
    load_state_strict(model, state, source=path, ignore_prefixes=("head.",))
    return model.eval()


def torchvision_state_dict(model):
    """A VideoSwin's state dict under torchvision swin3d's names (the inverse of `convert_torchvision_state_dict`):
    stages.i.blocks.j.* -> features.{2i}.j.*, stages.i.downsample.* -> features.{2i+1}.*, mlp.fc1/fc2 ->
    mlp.0/mlp.3, plus each block's `attn.relative_position_index` buffer [N, N] (int64; torchvision stores it, the
    loader drops it). `mask_token` [C] keeps its name (torchvision has none; `load_video_swin` loads it)."""
    out = {}
    for k, v in model.state_dict().items():
        if m := re.fullmatch(r"stages\.(\d+)\.blocks\.(\d+)\.(.+)", k):
            rest = m[3]
            for tv, ours in _TV_MLP.items():
                if rest.startswith(ours):
                    rest = tv + rest[len(ours):]
            out[f"features.{2 * int(m[1])}.{m[2]}.{rest}"] = v
            if rest == "attn.relative_position_bias_table":
                win = model.config.window_size
                out[f"features.{2 * int(m[1])}.{m[2]}.attn.relative_position_index"] = relative_position_index(win, win)
        elif m := re.fullmatch(r"stages\.(\d+)\.downsample\.(.+)", k):
            out[f"features.{2 * int(m[1]) + 1}.{m[2]}"] = v
        else:
            out[k] = v                                 # patch_embed.*, norm.*, mask_token
    return out


def save_video_swin(model, path):
    """Write a VideoSwin as a swin3d folder: `path/config.json` (`swin3d_config`, model_type "swin3d") and
    `path/model.safetensors` (`torchvision_state_dict`, mask_token included; no classification head). It loads
    back through `load_video_swin` (`model.load_encoder("video-swin", path)`)."""
    if not isinstance(model, VideoSwin):
        raise TypeError(f"save_video_swin writes a VideoSwin, got a {type(model).__name__}")
    sd = torchvision_state_dict(model)
    check_names_invert(model.state_dict(), convert_torchvision_state_dict(sd), path)
    return write_hf_folder(path, swin3d_config(model.config), sd)
