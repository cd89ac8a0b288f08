"""DeBERTa-V3, the i-Code language encoder, from scratch.

Papers: He et al. 2021, "DeBERTa: Decoding-enhanced BERT with Disentangled Attention" (attention, eq. 2-4,
section 3.1); He et al. 2021, "DeBERTaV3" (same encoder, ELECTRA-style pretraining, 128k SentencePiece vocab).
i-Code (Yang et al. 2022) uses the pretrained DeBERTa V3 base as its language encoder (12 layers, C = 768).
Reference implementations followed: microsoft/DeBERTa (`make_log_bucket_position`, `disentangled_att_bias`)
and Hugging Face `modeling_deberta_v2.py`. Submodules carry Hugging Face's names, so a checkpoint loads after
stripping the `deberta.` prefix.

Left out: the V2-xlarge extras (the first layer's ConvLayer, `embedding_size != hidden_size`), cross-attention
`query_states`, the enhanced mask decoder (a pretraining head, not part of the encoder).

Differences from the paper (the released code is what the checkpoints were trained with, so we follow it):
- relative positions are log-bucketed beyond `position_buckets / 2` (DeBERTa-V2/V3 code), not clamped at k;
- the position->content term indexes the relative embeddings with delta(i, j), not delta(j, i) as in eq. 4
  (the code negates the already negated offset); learned embeddings make the two equivalent up to a mirror;
- the relative embeddings are projected with the content W_q, W_k (`share_att_key`) and LayerNorm-ed first.
"""
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.weights import check_names_invert, load_state_strict, read_hf_folder, write_hf_folder


@dataclass
class DebertaConfig:
    vocab_size: int = 128100              # DeBERTa-V3 SentencePiece vocabulary (128k + specials)
    hidden_size: int = 768                # C, the width of every layer (base)
    num_hidden_layers: int = 12           # transformer layers (base)
    num_attention_heads: int = 12         # heads; head width d = hidden_size / heads = 64
    intermediate_size: int = 3072         # feed-forward width, 4 * C
    hidden_act: str = "gelu"              # feed-forward activation (exact erf GELU)
    hidden_dropout_prob: float = 0.1      # dropout on embeddings, sublayer outputs and relative embeddings
    attention_probs_dropout_prob: float = 0.1  # dropout on attention probabilities
    max_position_embeddings: int = 512    # absolute positions (only used if position_biased_input) and the
                                          # default max_relative_positions
    type_vocab_size: int = 0              # segment embeddings; V3 has none
    layer_norm_eps: float = 1e-7          # every LayerNorm
    pad_token_id: int = 0                 # padding id (padding_idx of the word embeddings)
    position_biased_input: bool = False   # add absolute position embeddings to the input (BERT-style); V3: no
    relative_attention: bool = True       # disentangled attention with relative positions
    max_relative_positions: int = -1      # largest relative distance; < 1 means max_position_embeddings
    position_buckets: int = 256           # relative-position buckets k; exact below k/2, log-spaced above
    norm_rel_ebd: str = "layer_norm"      # "layer_norm": LayerNorm the relative embedding table; "none"
    share_att_key: bool = True            # project relative embeddings with the content W_q, W_k (V2/V3)
    pos_att_type: list = field(default_factory=lambda: ["p2c", "c2p"])  # which position terms to add


DEBERTA_V3_BASE = DebertaConfig()  # microsoft/deberta-v3-base (the dataclass defaults)


def log_bucket_position(rel, buckets, max_position):
    """DeBERTa-V2/V3 `make_log_bucket_position`: keep offsets with |r| < buckets/2 exact, map larger ones to
    mid + ceil(log(|r| / mid) / log((max_position - 1) / mid) * (mid - 1)), with r's sign. rel: long tensor."""
    mid = buckets // 2
    sign = torch.sign(rel)
    abs_pos = torch.where((rel < mid) & (rel > -mid), torch.tensor(mid - 1).type_as(rel), rel.abs())
    log_pos = torch.ceil(torch.log(abs_pos / mid) / torch.log(torch.tensor((max_position - 1) / mid))
                         * (mid - 1)) + mid
    return torch.where(abs_pos <= mid, rel.type_as(log_pos), log_pos * sign).long()


def relative_position_index(T, cfg, device=None):
    """[T, T] long: row into the relative embedding table for query i, key j, i.e. delta(i, j) = bucket(i - j)
    + span clamped to [0, 2 span) (DeBERTa eq. 3's delta, with V2/V3 log buckets)."""
    span, max_rel = _spans(cfg)
    ids = torch.arange(T, device=device)
    rel = ids[:, None] - ids[None, :]  # i - j
    if cfg.position_buckets > 0:
        rel = log_bucket_position(rel, cfg.position_buckets, max_rel)
    return torch.clamp(rel + span, 0, 2 * span - 1)


def _spans(cfg):
    """(span k: half the relative embedding table, max relative distance)."""
    max_rel = cfg.max_relative_positions if cfg.max_relative_positions >= 1 else cfg.max_position_embeddings
    return (cfg.position_buckets if cfg.position_buckets > 0 else max_rel), max_rel


class DisentangledSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        assert cfg.hidden_size % cfg.num_attention_heads == 0
        C = cfg.hidden_size
        self.h, self.d = cfg.num_attention_heads, C // cfg.num_attention_heads
        self.query_proj, self.key_proj, self.value_proj = nn.Linear(C, C), nn.Linear(C, C), nn.Linear(C, C)
        self.pos_att_type = list(cfg.pos_att_type) if cfg.relative_attention else []
        # Eq. 4 sums up to three terms, so scores are scaled by 1/sqrt(3d) rather than 1/sqrt(d) (section 3.1);
        # like the released code, the factor counts c2p and p2c as configured, used or not.
        self.scale_factor = 1 + ("c2p" in cfg.pos_att_type) + ("p2c" in cfg.pos_att_type)
        if cfg.relative_attention and not cfg.share_att_key:  # DeBERTa-V1 style separate W_{k,r}, W_{q,r}
            if "c2p" in self.pos_att_type:
                self.pos_key_proj = nn.Linear(C, C)
            if "p2c" in self.pos_att_type:
                self.pos_query_proj = nn.Linear(C, C)
        self.share_att_key = cfg.share_att_key
        self.pos_dropout = nn.Dropout(cfg.hidden_dropout_prob)
        self.attn_dropout = cfg.attention_probs_dropout_prob

    def heads(self, x):  # [B, L, C] -> [B, h, L, d]
        return x.view(*x.shape[:-1], self.h, self.d).transpose(-3, -2)

    def forward(self, x, key_bias, rel_emb=None, rel_idx=None):
        """x [B, T, C]; key_bias [B, 1, 1, T] (0 or a large negative on padded keys);
        rel_emb [2k, C] (normed relative embeddings), rel_idx [T, T] long (delta(i, j))."""
        q, k, v = self.heads(self.query_proj(x)), self.heads(self.key_proj(x)), self.heads(self.value_proj(x))
        scale = (self.d * self.scale_factor) ** -0.5
        bias = key_bias.to(q.dtype)
        if self.pos_att_type:
            r = self.pos_dropout(rel_emb).unsqueeze(0)  # [1, 2k, C]
            T = x.shape[1]
            pos = 0
            if "c2p" in self.pos_att_type:
                # content->position, eq. 4 second term: Q^c_i . K^r_delta(i,j), with K^r = P W_{k,r}.
                k_r = self.heads(self.key_proj(r) if self.share_att_key else self.pos_key_proj(r))  # [1, h, 2k, d]
                c2p = q @ k_r.transpose(-1, -2)  # [B, h, T, 2k]: every query against every relative distance
                pos = pos + torch.gather(c2p, -1, rel_idx.expand(*c2p.shape[:2], T, T))
            if "p2c" in self.pos_att_type:
                # position->content, eq. 4 third term: K^c_j . Q^r_delta, with Q^r = P W_{q,r} (the released code
                # uses delta(i, j) here too; see the module docstring).
                q_r = self.heads(self.query_proj(r) if self.share_att_key else self.pos_query_proj(r))
                p2c = k @ q_r.transpose(-1, -2)  # [B, h, T(keys), 2k]
                pos = pos + torch.gather(p2c, -1, rel_idx.T.expand(*p2c.shape[:2], T, T)).transpose(-1, -2)
            # SDPA multiplies only q.k by `scale`, so the position terms get it here.
            bias = bias + pos * scale
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale,
                                             dropout_p=self.attn_dropout if self.training else 0.0)
        return out.transpose(1, 2).flatten(2)  # [B, T, C]


class _DenseNorm(nn.Module):
    """Post-LN sublayer output: LayerNorm(residual + dropout(dense(x)))."""

    def __init__(self, d_in, cfg):
        super().__init__()
        self.dense = nn.Linear(d_in, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, x, residual):
        return self.LayerNorm(residual + self.dropout(self.dense(x)))


class _Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.self = DisentangledSelfAttention(cfg)
        self.output = _DenseNorm(cfg.hidden_size, cfg)


ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "gelu_new": lambda t: F.gelu(t, approximate="tanh")}


class _Intermediate(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x):
        return self.act(self.dense(x))


class DebertaLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attention = _Attention(cfg)
        self.intermediate = _Intermediate(cfg)
        self.output = _DenseNorm(cfg.intermediate_size, cfg)

    def forward(self, x, key_bias, rel_emb, rel_idx):
        x = self.attention.output(self.attention.self(x, key_bias, rel_emb, rel_idx), x)
        return self.output(self.intermediate(x), x)


class _Embeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C = cfg.hidden_size
        self.word_embeddings = nn.Embedding(cfg.vocab_size, C, padding_idx=cfg.pad_token_id)
        if cfg.position_biased_input:
            self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, C)
        if cfg.type_vocab_size > 0:
            self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, C)
        self.LayerNorm = nn.LayerNorm(C, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids, valid):
        x = self.word_embeddings(input_ids)
        if hasattr(self, "position_embeddings"):
            x = x + self.position_embeddings(torch.arange(input_ids.shape[1], device=input_ids.device))
        if hasattr(self, "token_type_embeddings"):  # single segment: type 0 everywhere
            x = x + self.token_type_embeddings.weight[0]
        x = self.LayerNorm(x) * valid.unsqueeze(-1).to(x.dtype)  # padded positions zeroed, as in the reference
        return self.dropout(x)


class _Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layer = nn.ModuleList(DebertaLayer(cfg) for _ in range(cfg.num_hidden_layers))
        if cfg.relative_attention:
            self.rel_embeddings = nn.Embedding(2 * _spans(cfg)[0], cfg.hidden_size)  # P, rows 0..2k-1
            if "layer_norm" in [s.strip() for s in cfg.norm_rel_ebd.lower().split("|")]:
                self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class Deberta(nn.Module):
    """DeBERTa(-V3) encoder: forward(input_ids [B, T_l], attention_mask [B, T_l] or None)
    -> (hidden [B, T_l, C], valid [B, T_l] bool)."""

    def __init__(self, cfg=DEBERTA_V3_BASE):
        super().__init__()
        self.config, self.hidden_size = cfg, cfg.hidden_size
        self.embeddings = _Embeddings(cfg)
        self.encoder = _Encoder(cfg)

    @property
    def word_embeddings(self):
        return self.embeddings.word_embeddings

    def forward(self, input_ids, attention_mask=None):
        B, T = input_ids.shape
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        x = self.embeddings(input_ids, valid)
        # Padded keys get the most negative float (not -inf: a fully padded row then stays finite).
        key_bias = torch.zeros(B, 1, 1, T, dtype=x.dtype, device=x.device)
        key_bias = key_bias.masked_fill(~valid[:, None, None, :], torch.finfo(x.dtype).min)
        rel_emb = rel_idx = None
        if self.config.relative_attention:
            enc = self.encoder
            rel_emb = enc.LayerNorm(enc.rel_embeddings.weight) if hasattr(enc, "LayerNorm") else enc.rel_embeddings.weight
            rel_idx = relative_position_index(T, self.config, x.device)
        for layer in self.encoder.layer:
            x = layer(x, key_bias, rel_emb, rel_idx)
        return x, valid


# ---- loading and writing Hugging Face DebertaV2 checkpoints ----

_HF_DEFAULTS = dict(  # DebertaV2Config defaults (and the getattr defaults in modeling_deberta_v2.py)
    vocab_size=128100, hidden_size=1536, num_hidden_layers=24, num_attention_heads=24, intermediate_size=6144,
    hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, max_position_embeddings=512,
    type_vocab_size=0, layer_norm_eps=1e-7, pad_token_id=0, position_biased_input=True, relative_attention=False,
    max_relative_positions=-1, position_buckets=-1, norm_rel_ebd="none", share_att_key=False, pos_att_type=None)


def config_from_hf(cfg):
    """DebertaConfig from a Hugging Face DebertaV2 config.json dict (missing fields take HF's defaults).
    DeBERTa-V3 checkpoints are DebertaV2 models: model_type "deberta-v2"."""
    if cfg.get("model_type", "deberta-v2") != "deberta-v2":
        raise ValueError(f"model_type {cfg.get('model_type')!r}: expected 'deberta-v2' (DeBERTa-V2 / V3 checkpoints)")
    if cfg.get("conv_kernel_size", 0) > 0 or cfg.get("embedding_size", cfg.get("hidden_size")) != cfg.get("hidden_size"):
        raise ValueError("DeBERTa-V2 conv layer / embedding_size != hidden_size are not supported (V3 uses neither)")
    kw = {f.name: cfg.get(f.name, _HF_DEFAULTS[f.name]) for f in fields(DebertaConfig)}
    pat = kw["pos_att_type"]
    if isinstance(pat, str):
        pat = pat.lower().split("|")
    kw["pos_att_type"] = [p.strip() for p in (pat or []) if p.strip() and p.strip() != "none"]
    if kw["pad_token_id"] is None:
        kw["pad_token_id"] = 0
    if kw["hidden_act"] not in ACTIVATIONS:
        raise ValueError(f"hidden_act={kw['hidden_act']!r} is not supported (one of {sorted(ACTIVATIONS)})")
    return DebertaConfig(**kw)


def convert_hf_state_dict(sd):
    """Checkpoint names -> ours: strip `deberta.`; heads keep their names (listed as unused by the loader)."""
    return {(k[len("deberta."):] if k.startswith("deberta.") else k): v for k, v in sd.items()}


def load_deberta(path):
    """Build a Deberta from a Hugging Face folder (config.json + model.safetensors), strictly loaded, eval mode."""
    cfg, sd = read_hf_folder(path, config_from_hf)
    model = Deberta(cfg)
    load_state_strict(model, convert_hf_state_dict(sd), source=path)
    return model.eval()


def hf_config(cfg):
    """The Hugging Face DebertaV2 config.json dict of a DebertaConfig: every field `config_from_hf` reads, under
    HF's names (ours are HF's) and JSON types (pos_att_type a list), so `config_from_hf(hf_config(c)) == c`."""
    d = asdict(cfg)
    d["pos_att_type"] = list(cfg.pos_att_type)
    return {**d, "model_type": "deberta-v2", "architectures": ["DebertaV2Model"]}


def save_hf_folder(model, path):
    """Write a Deberta as a Hugging Face DebertaV2Model folder: `path/config.json` (`hf_config`) and
    `path/model.safetensors` under DebertaV2Model's key names (ours, with no `deberta.` prefix). It loads back
    through `load_deberta` (`model.load_encoder("deberta-v3", path)`) and `DebertaV2Model.from_pretrained`."""
    if not isinstance(model, Deberta):
        raise TypeError(f"save_hf_folder writes a Deberta, got a {type(model).__name__}")
    sd = model.state_dict()
    check_names_invert(sd, convert_hf_state_dict(sd), path)
    return write_hf_folder(path, hf_config(model.config), sd)
