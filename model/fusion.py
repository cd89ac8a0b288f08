"""The i-Code modality fusion network (paper section 4.1, Figure 1).

Features from each single-modality encoder are projected to the fusion width D by a one-layer
linear map, then fused by a Transformer encoder in one of two attention modes:

  merge-attention (Fig. 1a): one shared stack of classical (Vaswani et al. 2017, post-LN) encoder
      layers over the concatenation of all present modalities' tokens, each token carrying a learned
      modality-identification embedding. The paper's preset: 6 layers, width 768.
  co-attention (Fig. 1b): each layer runs modality-specific self-attention, then modality-specific
      cross-attention whose queries are that modality and whose keys/values are the concatenation of
      the *other* present modalities (Q_L^cross = X_L^self W_Lc^Q, K_L^cross = [X_V^self, X_S^self] W_Lc^K,
      V likewise), then the feed-forward sublayer. The paper's preset: 3 layers, width 768.

There are no positional embeddings here: "positional information is already incorporated by
single-modality encoders" (section 4.1). Every attention is `F.scaled_dot_product_attention` with a
boolean key-padding mask, so padded tokens never influence valid tokens' outputs.

Choice (the paper does not say): in co-attention the feed-forward sublayer is shared across
modalities by default (`co_ffn_per_modality=False`); only the attention parameters are described as
modality-specific. With the shared FFN the co-attention fusion plus heads has 169.5M parameters beside
the paper's 163M, with per-modality FFNs 197.8M (`python icode.py info --preset paper` prints the 169.5M and
the 28M the per-modality FFNs add).

Modality names used throughout the project: "video", "text", "audio" (the paper's V, L, S).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

MODALITIES = ("video", "text", "audio")  # fixed order: concatenation order in merge-attention


@dataclass
class FusionConfig:
    mode: str = "merge"               # "merge" (Fig. 1a) or "co" (Fig. 1b), section 4.1
    dim: int = 768                    # fusion width D (section 4.1: hidden size 768)
    layers: int = 6                   # 6 for merge, 3 for co-attention in the paper
    heads: int = 12                   # attention heads (BERT-base convention for width 768; not stated)
    mlp_ratio: int = 4                # FFN inner width = mlp_ratio * dim (Vaswani et al. 2017)
    dropout: float = 0.1              # dropout on attention probabilities and residual branches
    layer_norm_eps: float = 1e-5      # LayerNorm epsilon
    co_ffn_per_modality: bool = False  # co-attention: one FFN per modality instead of one shared FFN


class Attention(nn.Module):
    """Multi-head attention: queries from `x`, keys/values from `context` (= x for self-attention)."""

    def __init__(self, dim, heads, dropout):
        super().__init__()
        if dim % heads:
            raise ValueError(f"fusion dim ({dim}) must be divisible by heads ({heads})")
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x, context=None, key_valid=None):
        """x: [B, Lq, D]; context: [B, Lk, D] or None; key_valid: [B, Lk] bool, True = real token."""
        context = x if context is None else context
        B, Lq, D = x.shape
        h = self.heads
        q = self.q(x).view(B, Lq, h, D // h).transpose(1, 2)                       # (B, h, Lq, hs)
        k, v = self.kv(context).view(B, -1, 2, h, D // h).permute(2, 0, 3, 1, 4)   # 2 x (B, h, Lk, hs)
        mask = None if key_valid is None else key_valid[:, None, None, :]          # (B, 1, 1, Lk)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, Lq, D))


class FeedForward(nn.Module):
    def __init__(self, dim, hidden, dropout):
        super().__init__()
        self.fc1, self.fc2, self.drop = nn.Linear(dim, hidden), nn.Linear(hidden, dim), nn.Dropout(dropout)

    def forward(self, x):
        return self.fc2(self.drop(F.gelu(self.fc1(x))))


class MergeLayer(nn.Module):
    """Classical post-LN Transformer encoder layer (Vaswani et al. 2017), shared by all modalities."""

    def __init__(self, cfg):
        super().__init__()
        self.attn = Attention(cfg.dim, cfg.heads, cfg.dropout)
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.ffn = FeedForward(cfg.dim, cfg.mlp_ratio * cfg.dim, cfg.dropout)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, valid):
        x = self.norm1(x + self.drop(self.attn(x, key_valid=valid)))
        return self.norm2(x + self.drop(self.ffn(x)))


class CoLayer(nn.Module):
    """One co-attention layer (Fig. 1b): per-modality self-attention, cross-attention, FFN."""

    def __init__(self, cfg):
        super().__init__()
        D, eps = cfg.dim, cfg.layer_norm_eps
        self.self_attn = nn.ModuleDict({m: Attention(D, cfg.heads, cfg.dropout) for m in MODALITIES})
        self.self_norm = nn.ModuleDict({m: nn.LayerNorm(D, eps=eps) for m in MODALITIES})
        self.cross_attn = nn.ModuleDict({m: Attention(D, cfg.heads, cfg.dropout) for m in MODALITIES})
        self.cross_norm = nn.ModuleDict({m: nn.LayerNorm(D, eps=eps) for m in MODALITIES})
        if cfg.co_ffn_per_modality:
            self.ffn = nn.ModuleDict({m: FeedForward(D, cfg.mlp_ratio * D, cfg.dropout) for m in MODALITIES})
        else:  # one FFN object registered under every modality: shared weights
            shared = FeedForward(D, cfg.mlp_ratio * D, cfg.dropout)
            self.ffn = nn.ModuleDict({m: shared for m in MODALITIES})
        self.ffn_norm = nn.ModuleDict({m: nn.LayerNorm(D, eps=eps) for m in MODALITIES})
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, xs, valids):
        """xs, valids: dicts over the present modalities of [B, L_m, D] and [B, L_m] bool (or None)."""
        # X_m^self = Self-Attention-m(X_m W_m^Q, X_m W_m^K, X_m W_m^V)   (section 4.1)
        s = {m: self.self_norm[m](x + self.drop(self.self_attn[m](x, key_valid=valids[m]))) for m, x in xs.items()}
        out = {}
        for m, x in s.items():
            others = [o for o in s if o != m]
            if others:  # X_m^cross: queries from m, keys/values from [X_o^self for the other modalities]
                ctx = torch.cat([s[o] for o in others], dim=1)
                kv_valid = _cat_valid([valids[o] for o in others], [s[o] for o in others])
                x = self.cross_norm[m](x + self.drop(self.cross_attn[m](x, ctx, key_valid=kv_valid)))
            # else: a single modality has nothing to attend to across modalities; cross-attention is skipped.
            out[m] = self.ffn_norm[m](x + self.drop(self.ffn[m](x)))
        return out


def _cat_valid(valids, xs):
    """Concatenate padding masks, filling None (no padding) with all-True; None if all are None."""
    if all(v is None for v in valids):
        return None
    return torch.cat([torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if v is None else v
                      for v, x in zip(valids, xs)], dim=1)


def masked_mean(x, valid):
    """Mean over valid tokens. x: [B, L, D]; valid: [B, L] bool or None -> [B, D] (section 4.2.2)."""
    if valid is None:
        return x.mean(1)
    w = valid.to(x.dtype).unsqueeze(-1)                       # (B, L, 1)
    return (x * w).sum(1) / w.sum(1).clamp_min(1.0)


def joint_representation(tokens, valids):
    """The multimodal representation of section 5.2 ("the average of the outputs from the fusion network").

    tokens: {m: fused tokens [B, L_m, D]}; valids: {m: [B, L_m] bool or None} -> [B, D]. Each modality's tokens
    are first averaged over its valid positions (video over all T_v*H_v*W_v cells), then the per-modality means
    are averaged with equal weight: a modality counts the same whatever its length (99 speech frames do not
    outvote 8 video cells or 20 text tokens).
    """
    return torch.stack([masked_mean(tokens[m], valids.get(m)) for m in MODALITIES if m in tokens]).mean(0)


class FusionNetwork(nn.Module):
    """Projections + merge- or co-attention fusion over any non-empty subset of the modalities.

    input_dims: {"video": C_v, "text": C_l, "audio": C_s}, the encoders' output widths.
    """

    def __init__(self, cfg: FusionConfig, input_dims: dict):
        super().__init__()
        if cfg.mode not in ("merge", "co"):
            raise ValueError(f"fusion mode must be 'merge' or 'co', got {cfg.mode!r}")
        if set(input_dims) != set(MODALITIES):
            raise ValueError(f"input_dims must name {MODALITIES}, got {sorted(input_dims)}")
        self.cfg = cfg
        # "projected to the fusion network's hidden dimension by a 1-layer feed-forward network" (4.1)
        self.proj = nn.ModuleDict({m: nn.Linear(input_dims[m], cfg.dim) for m in MODALITIES})
        if cfg.mode == "merge":
            # identification embedding per modality, added on all temporal and spatial positions (4.1)
            self.modality_embed = nn.Parameter(torch.zeros(len(MODALITIES), cfg.dim))
            nn.init.normal_(self.modality_embed, std=0.02)
            self.layers = nn.ModuleList([MergeLayer(cfg) for _ in range(cfg.layers)])
        else:
            self.layers = nn.ModuleList([CoLayer(cfg) for _ in range(cfg.layers)])

    def forward(self, feats, valids=None):
        """Fuse the given modalities.

        feats:  {modality: [B, L_m, C_m]} for a non-empty subset of MODALITIES; a video grid
                [B, T_v, H_v, W_v, C_v] is flattened to L_v = T_v * H_v * W_v tokens (section 4.1).
        valids: {modality: [B, L_m] bool, True = real token} (missing or None: no padding).
        Returns {modality: fused tokens [B, L_m, D]} (video flattened in the same T, H, W order).
        """
        present = [m for m in MODALITIES if m in feats]
        unknown = set(feats) - set(MODALITIES)
        if not present or unknown:
            raise ValueError(f"feats must hold a non-empty subset of {MODALITIES}, got {sorted(feats)}")
        valids = dict(valids or {})
        xs, vs = {}, {}
        for m in present:
            x = feats[m]
            if x.dim() == 5:
                x = x.flatten(1, 3)                            # (B, T_v*H_v*W_v, C_v)
            x = self.proj[m](x)
            if self.cfg.mode == "merge":
                x = x + self.modality_embed[MODALITIES.index(m)]
            xs[m], vs[m] = x, valids.get(m)
            if vs[m] is not None and vs[m].shape != x.shape[:2]:
                raise ValueError(f"{m}: valid mask {tuple(vs[m].shape)} does not match tokens {tuple(x.shape[:2])}")
        if self.cfg.mode == "co":
            for layer in self.layers:
                xs = layer(xs, vs)
            return xs
        lengths = [xs[m].shape[1] for m in present]
        x = torch.cat([xs[m] for m in present], dim=1)         # (B, sum L_m, D)
        valid = _cat_valid([vs[m] for m in present], [xs[m] for m in present])
        for layer in self.layers:
            x = layer(x, valid)
        return dict(zip(present, x.split(lengths, dim=1)))
