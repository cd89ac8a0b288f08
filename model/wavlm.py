"""WavLM speech encoder (Chen et al. 2022), with HuBERT (Hsu et al. 2021) as the variant without gated bias.

i-Code (Yang et al. 2022, Sec. 3.1) uses WavLM-large as its speech encoder: a 7-layer convolutional feature
encoder turns a 16 kHz waveform into 50 frames a second (T_s, 320-sample stride), a Transformer contextualises
them. WavLM's one change to HuBERT's Transformer is a gated relative position bias added to the attention logits.

Numerics follow Hugging Face `transformers` (models/wavlm/modeling_wavlm.py, models/hubert/modeling_hubert.py),
and HF checkpoints load through `load_speech_encoder` (see `convert_hf_state_dict` for the key names).

Differences from the reference implementation:
- All attention goes through `F.scaled_dot_product_attention` with the (gated) position bias and the padding
  mask folded into one additive float mask. HF WavLM calls `F.multi_head_attention_forward`, which computes
  the same softmax((q k^T) / sqrt(d) + bias + pad) v; it also returns head-averaged weights, which we don't.
- Padded keys get the dtype's most negative value rather than -inf, so a row with no valid frame gives no NaN.
- No LayerDrop, no SpecAugment (frames to mask come in as `frame_mask`, chosen by the pretraining objective),
  no adapter layers, no `conv_pos_batch_norm` (a HuBERT-config option no released checkpoint we use sets).
"""
import dataclasses
import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.weights import check_names_invert, load_state_strict, read_hf_folder, write_hf_folder

# The 7-layer convolutional feature encoder of wav2vec 2.0, HuBERT and WavLM: one frame per 320 samples (20 ms
# at 16 kHz). The speech targets (model/quantizers.py) and the data pipeline's frame counts use the same numbers.
SPEECH_KERNELS = (10, 3, 3, 3, 3, 2, 2)
SPEECH_STRIDES = (5, 2, 2, 2, 2, 2, 2)


@dataclass
class SpeechConfig:
    hidden_size: int = 768                    # C, Transformer width (1024 in the large models)
    num_hidden_layers: int = 12               # Transformer layers (24 in the large models)
    num_attention_heads: int = 12             # attention heads (head_dim 64 in all presets)
    intermediate_size: int = 3072             # feed-forward inner width (4 * hidden_size)
    conv_dim: tuple = (512,) * 7              # channels of the 7 feature-encoder convolutions
    conv_kernel: tuple = SPEECH_KERNELS       # their kernel sizes (receptive field 400 samples = 25 ms)
    conv_stride: tuple = SPEECH_STRIDES       # their strides (product 320 samples = 20 ms)
    conv_bias: bool = False                   # bias in the feature-encoder convolutions (True in large models)
    feat_extract_norm: str = "group"          # "group": GroupNorm in conv 0 only (base); "layer": LayerNorm after every conv (large)
    feat_proj_layer_norm: bool = True         # LayerNorm before the feature projection (always in WavLM; a HuBERT option)
    do_stable_layer_norm: bool = False        # True: pre-LN layers + final LayerNorm (large); False: post-LN (base)
    num_conv_pos_embeddings: int = 128        # kernel of the convolutional positional embedding
    num_conv_pos_embedding_groups: int = 16   # its groups
    layer_norm_eps: float = 1e-5              # eps of the Transformer and feature LayerNorms
    gated_relative_position_bias: bool = True  # True: WavLM; False: HuBERT (no position bias in attention)
    num_buckets: int = 320                    # relative-position buckets (half per direction)
    max_bucket_distance: int = 800            # distance (frames) at which the log-spaced buckets saturate
    hidden_act: str = "gelu"                  # feed-forward activation (exact erf GELU; the only one supported)
    hidden_dropout: float = 0.1               # dropout on attention / feed-forward outputs and after pos-conv
    attention_dropout: float = 0.1            # dropout on attention probabilities
    activation_dropout: float = 0.1           # dropout after the feed-forward activation
    feat_proj_dropout: float = 0.0            # dropout after the feature projection
    mask_time_prob: float = 0.05              # unused here: the pretraining objective chooses `frame_mask`
    mask_time_length: int = 10                # unused here: span length of that masking (WavLM/HuBERT recipe)


# WavLM-large (microsoft/wavlm-large), the speech encoder of i-Code; HuBERT-large (facebook/hubert-large-ll60k).
WAVLM_LARGE = SpeechConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                           conv_bias=True, feat_extract_norm="layer", do_stable_layer_norm=True)
HUBERT_LARGE = dataclasses.replace(WAVLM_LARGE, gated_relative_position_bias=False)


def conv_output_length(n, kernels, strides):
    """Frames out of a stack of unpadded convolutions for n input samples (int or LongTensor; floor division)."""
    for k, s in zip(kernels, strides):
        n = (n - k) // s + 1
    return n


class ConvFeatureEncoder(nn.Module):
    """Waveform [B, N] -> features [B, C, T_s]: Conv1d -> (GroupNorm | LayerNorm | nothing) -> GELU, 7 times.

    norm="group": GroupNorm with one group per channel after the first convolution only. It normalises each
    channel over the whole (padded) length, so padding changes every frame: HF tells users of such models
    (wavlm-base, hubert-base) to zero-pad and pass no attention mask. norm="layer": LayerNorm over channels
    after every convolution, per frame, so valid frames never see padding.
    Submodule names match HF (`conv_layers.{i}.conv`, `conv_layers.{i}.layer_norm`).
    """

    def __init__(self, conv_dim: tuple, conv_kernel: tuple, conv_stride: tuple, conv_bias: bool, norm: str):
        super().__init__()
        if norm not in ("group", "layer"):
            raise ValueError(f"norm must be 'group' or 'layer', got {norm!r}")
        self.norm, self.kernels, self.strides = norm, tuple(conv_kernel), tuple(conv_stride)
        self.conv_layers = nn.ModuleList()
        for i, (c, k, s) in enumerate(zip(conv_dim, conv_kernel, conv_stride)):
            block = nn.Module()
            block.conv = nn.Conv1d(conv_dim[i - 1] if i else 1, c, k, stride=s, bias=conv_bias)
            if norm == "layer":
                block.layer_norm = nn.LayerNorm(c)  # HF uses the default eps (1e-5) here, not layer_norm_eps
            elif i == 0:
                block.layer_norm = nn.GroupNorm(c, c, affine=True)
            self.conv_layers.append(block)

    def forward(self, wave):
        if self.norm == "layer":
            return self.forward_channels_last(wave)
        x = wave[:, None]                                     # [B, 1, N]
        for block in self.conv_layers:
            x = block.conv(x)                                 # [B, C, T]
            if hasattr(block, "layer_norm"):
                x = block.layer_norm(x)
            x = F.gelu(x)
        return x                                              # [B, C, T_s]

    def forward_channels_last(self, wave):
        """norm="layer": activations stay time-major, [B, T, C] in memory, from the first convolution on.
        LayerNorm over channels then reads contiguous rows, and each convolution runs as a 2-D one on the
        channels-last view [B, C, 1, T] of that memory (cuDNN's native layout for bf16): no transposes."""
        # [B, 1, 1, N] with the strides of a channels-last tensor (N, 1, N, 1): one channel is both layouts,
        # but these strides are what makes the first convolution's output channels-last as well.
        x = wave[:, :, None].transpose(1, 2)[:, :, None, :]
        for block in self.conv_layers:
            conv, ln = block.conv, block.layer_norm
            w = conv.weight[:, :, None, :].contiguous(memory_format=torch.channels_last)  # [C_out, C_in, 1, k]
            x = F.conv2d(x, w, conv.bias, stride=(1, conv.stride[0]))  # [B, C, 1, T], channels-last
            x = F.gelu(F.layer_norm(x.squeeze(2).transpose(1, 2), ln.normalized_shape, ln.weight, ln.bias, ln.eps))
            x = x.transpose(1, 2)[:, :, None, :]              # [B, T, C] memory viewed as [B, C, 1, T]
        return x.squeeze(2)                                   # [B, C, T_s] (a view of [B, T_s, C] memory)


class PositionalConvEmbedding(nn.Module):
    """Grouped convolution over time with weight normalisation over the kernel axis (dim=2), then GELU.

    Stored as explicit `weight_g` [1, 1, k] and `weight_v` [C, C/groups, k] (the legacy weight_norm names);
    weight = weight_v * weight_g / ||weight_v|| with the norm over output and input channels, per tap.
    """

    def __init__(self, c, k, groups):
        super().__init__()
        self.k, self.groups = k, groups
        self.weight_g = nn.Parameter(torch.ones(1, 1, k))
        self.weight_v = nn.Parameter(torch.randn(c, c // groups, k) * 2 * math.sqrt(1 / (k * c)))  # HF init
        self.bias = nn.Parameter(torch.zeros(c))
        with torch.no_grad():
            self.weight_g.copy_(self.weight_v.norm(dim=(0, 1), keepdim=True))

    def conv_weight(self):                                    # [C, C/groups, k]
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=(0, 1), keepdim=True))

    def forward(self, x):                                     # [B, T, C] -> [B, T, C]
        """The grouped convolution over time (Hugging Face's Conv1d), computed as a 2-D convolution on the
        channels-last view [B, C, 1, T] of the [B, T, C] memory, as in the feature encoder: the call eager conv1d
        makes of a transposed view, and one that torch.compile keeps a view (as a conv1d it makes a [B, C, T]
        copy). An even kernel with padding k // 2 gives T + 1 frames: the last is dropped, as Hugging Face does."""
        w = self.conv_weight()[:, :, None, :].contiguous(memory_format=torch.channels_last)  # [C, C/groups, 1, k]
        y = F.conv2d(x.transpose(1, 2)[:, :, None, :], w, self.bias, padding=(0, self.k // 2), groups=self.groups)
        if self.k % 2 == 0:
            y = y[..., :-1]                                   # an even kernel with padding k//2 gives T+1 frames
        return F.gelu(y.squeeze(2)).transpose(1, 2)


def relative_position_bucket(rel, num_buckets, max_distance):
    """WavLM/T5 bidirectional buckets: half per direction; exact below num_buckets/4, log-spaced up to max_distance."""
    num_buckets //= 2
    buckets = (rel > 0).long() * num_buckets
    rel = rel.abs()
    max_exact = num_buckets // 2
    large = max_exact + (torch.log(rel.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(rel < max_exact, rel, large)


def distance_bias(embed, t, num_buckets, max_distance):
    """The per-distance biases [2T - 1, H] of WavLM's relative position bias (Chen et al. 2022, Eq. 5-6): row m for
    key minus query position m - (T - 1), one bucket lookup in `embed` (the [num_buckets, H] table) per distance."""
    rel = torch.arange(1 - t, t, device=embed.weight.device)
    return embed(relative_position_bucket(rel, num_buckets, max_distance))


def toeplitz(v, t):
    """Per-distance biases v [2T - 1, H] -> the [H, T, T] bias, bias[h, i, j] = v[j - i + T - 1, h], as a strided
    view: window s is w[s, j] = v[s + j] (stride 1 along s and j), and query row i is window T - 1 - i.

    The same values as a bucket lookup per (i, j) pair (Hugging Face's way), with 2T - 1 lookups instead of T^2:
    under torch.compile each element of the bias is one load from v (docs/speed.md)."""
    v = v.contiguous()
    h = v.shape[1]
    return v.as_strided((t, t, h), (h, h, 1)).flip(0).permute(2, 0, 1)


class Attention(nn.Module):
    """Multi-head self-attention; in WavLM, plus the gated relative position bias of Chen et al. 2022, Eq. 5-6."""

    def __init__(self, cfg: SpeechConfig, has_bias_embedding: bool):
        super().__init__()
        c, self.h = cfg.hidden_size, cfg.num_attention_heads
        self.dropout = cfg.attention_dropout
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(c, c) for _ in range(4))
        self.gated = cfg.gated_relative_position_bias
        if self.gated:
            self.num_buckets, self.max_distance = cfg.num_buckets, cfg.max_bucket_distance
            self.gru_rel_pos_const = nn.Parameter(torch.ones(1, self.h, 1, 1))
            self.gru_rel_pos_linear = nn.Linear(c // self.h, 8)
            if has_bias_embedding:                            # layer 0 only; every layer looks up in it
                self.rel_attn_embed = nn.Embedding(cfg.num_buckets, self.h)

    def forward(self, x, pad_mask, rel_embed):
        """x [B, T, C]; pad_mask [B, 1, 1, T] additive float or None; rel_embed: layer 0's bucket table
        (`rel_attn_embed`; None without the gated bias)."""
        b, t, c = x.shape
        q, k, v = (p(x).view(b, t, self.h, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        attn_mask = pad_mask
        if self.gated:
            # Every layer looks the 2T - 1 distances up in layer 0's table, where Hugging Face looks them up in
            # layer 0 and hands the [H, T, T] bias on: the same values and gradients (each layer's bias gradient
            # then goes back to the table on its own path; docs/speed.md).
            pos = toeplitz(distance_bias(rel_embed, t, self.num_buckets, self.max_distance), t)   # [H, T, T]
            # The gate looks at this layer's input split into heads: two sigmoid gates per head and query frame,
            # gate = a * (b * const - 1) + 2, scaling that query's row of the bias.
            proj = self.gru_rel_pos_linear(x.view(b, t, self.h, -1).transpose(1, 2))  # [B, H, T, 8]
            gate_a, gate_b = torch.sigmoid(proj.view(b, self.h, t, 2, 4).sum(-1)).chunk(2, dim=-1)
            gate = gate_a * (gate_b * self.gru_rel_pos_const - 1.0) + 2.0           # [B, H, T, 1]
            # In the compute dtype: the [B, H, T, T] bias is the largest tensor of the layer, and SDPA would
            # cast a float32 one anyway (one pass over it saved, half the bytes written).
            gate, pos = gate.to(q.dtype), pos.to(q.dtype)
            attn_mask = (gate * pos if pad_mask is None                                  # [B, H, T, T]
                         else torch.addcmul(pad_mask.to(q.dtype), gate, pos))            # one pass, not two
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, c))


class EncoderLayer(nn.Module):
    """Attention + feed-forward, pre-LN ("stable", large models) or post-LN (base models)."""

    def __init__(self, cfg: SpeechConfig, index: int):
        super().__init__()
        self.pre_ln = cfg.do_stable_layer_norm
        self.attention = Attention(cfg, has_bias_embedding=(index == 0))
        self.layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.intermediate_dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.output_dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout, self.act_dropout = nn.Dropout(cfg.hidden_dropout), nn.Dropout(cfg.activation_dropout)

    def feed_forward(self, x):
        return self.dropout(self.output_dense(self.act_dropout(F.gelu(self.intermediate_dense(x)))))

    def forward(self, x, pad_mask, rel_embed):
        if self.pre_ln:
            x = x + self.dropout(self.attention(self.layer_norm(x), pad_mask, rel_embed))
            return x + self.feed_forward(self.final_layer_norm(x))
        x = self.layer_norm(x + self.dropout(self.attention(x, pad_mask, rel_embed)))
        return self.final_layer_norm(x + self.feed_forward(x))


class SpeechEncoder(nn.Module):
    """WavLM / HuBERT: waveform [B, N] -> (hidden [B, T_s, C], valid [B, T_s] bool)."""

    def __init__(self, config: SpeechConfig):
        super().__init__()
        if config.hidden_act != "gelu":
            raise ValueError(f"only hidden_act='gelu' is supported, got {config.hidden_act!r}")
        self.config, self.hidden_size = config, config.hidden_size
        c_feat = config.conv_dim[-1]
        self.feature_extractor = ConvFeatureEncoder(config.conv_dim, config.conv_kernel, config.conv_stride,
                                                    config.conv_bias, config.feat_extract_norm)
        self.feature_norm = (nn.LayerNorm(c_feat, eps=config.layer_norm_eps) if config.feat_proj_layer_norm
                             else nn.Identity())
        self.feature_projection = nn.Linear(c_feat, config.hidden_size)
        self.feat_dropout = nn.Dropout(config.feat_proj_dropout)
        self.masked_spec_embed = nn.Parameter(torch.rand(config.hidden_size))  # replaces masked frames (HF init)
        self.pos_conv = PositionalConvEmbedding(config.hidden_size, config.num_conv_pos_embeddings,
                                                config.num_conv_pos_embedding_groups)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList(EncoderLayer(config, i) for i in range(config.num_hidden_layers))
        # After the layers (pre-LN) or right after the positional embedding (post-LN).
        self.encoder_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, waveform, attention_mask=None, frame_mask=None):
        """waveform [B, N]; attention_mask [B, N] (1 = real sample) or None; frame_mask [B, T_s] bool, True = masked."""
        feats = self.feature_extractor(waveform).transpose(1, 2)                    # [B, T_s, C_feat]
        b, t, _ = feats.shape
        x = self.feat_dropout(self.feature_projection(self.feature_norm(feats)))  # [B, T_s, C]
        if frame_mask is not None:
            x = torch.where(frame_mask[..., None], self.masked_spec_embed.to(x.dtype), x)
        pad_mask = None
        if attention_mask is None:
            valid = torch.ones(b, t, dtype=torch.bool, device=x.device)
        else:
            lengths = conv_output_length(attention_mask.long().sum(-1), self.config.conv_kernel,
                                         self.config.conv_stride)
            valid = torch.arange(t, device=x.device)[None, :] < lengths[:, None]     # [B, T_s]
            x = x.masked_fill(~valid[..., None], 0.0)  # padded frames must not leak through the pos-conv
            pad_mask = torch.zeros(b, 1, 1, t, dtype=x.dtype, device=x.device)
            pad_mask = pad_mask.masked_fill(~valid[:, None, None, :], torch.finfo(x.dtype).min)
        x = x + self.pos_conv(x)
        if not self.config.do_stable_layer_norm:
            x = self.encoder_norm(x)
        x = self.dropout(x)
        gated = self.config.gated_relative_position_bias and len(self.layers) > 0
        rel_embed = self.layers[0].attention.rel_attn_embed if gated else None   # the bucket table, layer 0's
        for layer in self.layers:
            x = layer(x, pad_mask, rel_embed)
        if self.config.do_stable_layer_norm:
            x = self.encoder_norm(x)
        return x, valid


# ---------------------------------------------------------------------------------------------------------
# Loading Hugging Face checkpoints (WavLMModel / HubertModel, or their *ForCTC etc. wrappers), and writing them

def config_from_hf(cfg: dict) -> SpeechConfig:
    """SpeechConfig from a WavLMConfig or HubertConfig `config.json` dict (`model_type` decides which; a
    config without one is WavLM when it has WavLM's `num_buckets`)."""
    kind = cfg.get("model_type")
    if kind not in ("wavlm", "hubert", None):  # wav2vec 2.0, UniSpeech-SAT, ... share HuBERT's key names
        raise ValueError(f"model_type {kind!r} is neither 'wavlm' nor 'hubert'")
    hubert = kind == "hubert" or (kind is None and "num_buckets" not in cfg)
    for key, ok in (("feat_extract_activation", "gelu"), ("hidden_act", "gelu"), ("add_adapter", False),
                    ("conv_pos_batch_norm", False)):
        if cfg.get(key, ok) != ok:
            raise ValueError(f"{key}={cfg[key]!r} is not supported (expected {ok!r})")
    fields = {f.name for f in dataclasses.fields(SpeechConfig)}
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items() if k in fields}
    kw["gated_relative_position_bias"] = not hubert
    if not hubert:
        kw["feat_proj_layer_norm"] = True              # WavLM always has it (the field is HuBERT's)
    return SpeechConfig(**kw)


_BODY = ("feature_extractor.", "feature_projection.", "encoder.", "masked_spec_embed")
_RENAMES = (  # HF name piece -> ours, applied in order to body keys
    ("feature_projection.layer_norm.", "feature_norm."),
    ("feature_projection.projection.", "feature_projection."),
    ("encoder.pos_conv_embed.conv.", "pos_conv."),
    ("parametrizations.weight.original0", "weight_g"),  # torch.nn.utils.parametrizations.weight_norm names
    ("parametrizations.weight.original1", "weight_v"),
    ("encoder.layer_norm.", "encoder_norm."),
    ("encoder.layers.", "layers."),
    (".feed_forward.", "."),
)


def convert_hf_state_dict(sd: dict) -> dict:
    """HF WavLM/HuBERT checkpoint keys -> ours. Heads (lm_head.*, quantizer.*, project_q ...) keep their names."""
    out = {}
    for key, v in sd.items():
        for prefix in ("wavlm.", "hubert."):
            if key.startswith(prefix) and key[len(prefix):].startswith(_BODY):
                key = key[len(prefix):]
        if key.startswith(_BODY):
            for old, new in _RENAMES:
                key = key.replace(old, new)
        out[key] = v
    return out


def load_speech_encoder(path) -> SpeechEncoder:
    """A SpeechEncoder from a HF folder (config.json + model.safetensors), in eval mode."""
    cfg, sd = read_hf_folder(path, config_from_hf)
    model = SpeechEncoder(cfg)
    sd = convert_hf_state_dict(sd)
    # HF creates masked_spec_embed only when mask_time_prob or mask_feature_prob > 0; keep our init otherwise.
    sd.setdefault("masked_spec_embed", model.masked_spec_embed.detach().clone())
    load_state_strict(model, sd, source=str(path))
    return model.eval()


def hf_config(cfg: SpeechConfig) -> dict:
    """The Hugging Face config.json dict of a SpeechConfig: a WavLMConfig when `gated_relative_position_bias`, else a
    HubertConfig, with HF's field names (ours are HF's) and JSON types; `config_from_hf` reads it back to `cfg`
    (for HuBERT, up to the bucket fields, which HuBERT has none of and ignores). `layerdrop` is 0: this encoder
    has no LayerDrop, and HF's default (0.1) would drop layers when trained there."""
    if cfg.hidden_act != "gelu":
        raise ValueError(f"only hidden_act='gelu' can be written, got {cfg.hidden_act!r}")
    wavlm = cfg.gated_relative_position_bias
    if wavlm and not cfg.feat_proj_layer_norm:
        raise ValueError("a WavLM config always has the feature LayerNorm: feat_proj_layer_norm=False cannot be written")
    d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}
    del d["gated_relative_position_bias"]              # ours: which of the two model types this is
    if wavlm:
        del d["feat_proj_layer_norm"]                  # a HuBERT field; WavLM always has the LayerNorm
    else:
        del d["num_buckets"], d["max_bucket_distance"]  # WavLM's gated bias fields
        d["conv_pos_batch_norm"] = False
    d.update(feat_extract_activation="gelu", add_adapter=False, layerdrop=0.0,
             num_feat_extract_layers=len(cfg.conv_dim), model_type="wavlm" if wavlm else "hubert",
             architectures=["WavLMModel" if wavlm else "HubertModel"])
    return d


def hf_state_key(key: str) -> str:
    """Our state dict key -> WavLMModel / HubertModel's (the inverse of `convert_hf_state_dict` on body keys):
    feature_norm / feature_projection -> feature_projection.{layer_norm, projection}, pos_conv -> the positional
    conv with torch's weight_norm parametrization names (what current transformers saves and loads),
    encoder_norm -> encoder.layer_norm, layers.i -> encoder.layers.i with the feed-forward's two Linear layers
    under `feed_forward.`."""
    if key.startswith("feature_norm."):
        return "feature_projection.layer_norm." + key[len("feature_norm."):]
    if key.startswith("feature_projection."):
        return "feature_projection.projection." + key[len("feature_projection."):]
    if key.startswith("pos_conv."):
        param = {"weight_g": "parametrizations.weight.original0", "weight_v": "parametrizations.weight.original1"}
        name = key[len("pos_conv."):]
        return "encoder.pos_conv_embed.conv." + param.get(name, name)
    if key.startswith("encoder_norm."):
        return "encoder.layer_norm." + key[len("encoder_norm."):]
    if key.startswith("layers."):
        return "encoder." + re.sub(r"^(layers\.\d+\.)((?:intermediate|output)_dense\.)", r"\1feed_forward.\2", key)
    return key                                         # feature_extractor.*, masked_spec_embed: HF's names


def save_hf_folder(model: SpeechEncoder, path) -> str:
    """Write a SpeechEncoder as a Hugging Face WavLMModel (gated relative position bias) or HubertModel folder:
    `path/config.json` (`hf_config`) and `path/model.safetensors` under HF's key names (`hf_state_key`), with
    `masked_spec_embed` (ours trains it; HF creates it when mask_time_prob > 0). It loads back through
    `load_speech_encoder` (`model.load_encoder("wavlm" / "hubert", path)`) and `WavLMModel / HubertModel
    .from_pretrained`."""
    if not isinstance(model, SpeechEncoder):
        raise TypeError(f"save_hf_folder writes a SpeechEncoder, got a {type(model).__name__}")
    config = hf_config(model.config)
    own = model.state_dict()
    sd = {hf_state_key(k): v for k, v in own.items()}
    check_names_invert(own, convert_hf_state_dict(sd), path)
    return write_hf_folder(path, config, sd)
