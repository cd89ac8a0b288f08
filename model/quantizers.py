"""Frozen tokenizers that turn video frames and speech into the discrete targets of MVM and MSM.

i-Code section 4.2.1 and appendix A.1: every masked unit is predicted as a discrete token. Text tokens are
the tokenizer's ids (nothing to do here); visual tokens come from a VQ-VAE (PeCo, Dong et al. 2021) applied
to each frame, one id per 16x16 patch; speech tokens come from the wav2vec 2.0 quantizer (Baevski et al.
2020). This file provides three families, all frozen `nn.Module`s (weights and codebooks are parameters or
buffers, so `.to(device)` moves them) whose forward runs under `torch.no_grad()`:

    VQGANTokenizer                    video [B, 3, T, H, W] -> ids [B, T, H/16, W/16]   (PeCo's family)
    Wav2Vec2Quantizer                 wave  [B, N]          -> ids [B, T_s, G]          (G = 2 groups of 320)
    RandomProjectionVideoTokenizer    video [B, 3, T, H, W] -> ids [B, T, H/16, W/16]   (BEST-RQ, no weights)
    RandomProjectionSpeechTokenizer   wave  [B, N]          -> ids [B, T_s, G]          (BEST-RQ, no weights)

    load_quantizer(kind, path)        "wav2vec2" | "vqgan" from a Hugging Face-style folder
    build_default_quantizers(...)     the random-projection pair, the default when no weights are given
    combined_index(ids, vars)         fairseq's `to_codebook_index`: i0 * vars + i1 for G = 2
    fingerprint(*tokenizers)          a short hash of what the tokenizers compute (offline target caches)
    nearest_code(z, codebook)         id of the closest code in squared Euclidean distance (float32)

Speech frames: all speech tokenizers give exactly T_s = conv_output_length(N, (10,3,3,3,3,2,2),
(5,2,2,2,2,2,2)) = floor((N - 400) / 320) + 1 frames, the speech encoder's frame count, so targets line up
1:1 with encoder frames (20 ms, 320-sample stride at 16 kHz).

Pixel range: the video tokenizers take the video exactly as the vision encoder gets it. The VQGAN undoes
the normalisation given by `input_mean` / `input_std` (ImageNet statistics by default, as for Video Swin)
and feeds [-1, 1] pixels, the range taming-transformers' VQGAN was trained on. The random-projection
tokenizer normalises each patch itself and needs no statistics.

Left out: the VQGAN decoder (only the encoder + codebook lookup is needed for targets), Gumbel sampling
(training-time only; at inference wav2vec 2.0 takes the argmax), padding-aware speech tokenisation (the
group-norm conv encoder of wav2vec2-base normalises over the whole padded length, as in the speech encoder).

Differences from the paper: the paper uses PeCo weights for visual tokens; when no weights are given we
fall back to BEST-RQ random-projection tokens (Chiu et al. 2022) so that pretraining runs anywhere.
"""
import dataclasses
import hashlib
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.wavlm import SPEECH_KERNELS, SPEECH_STRIDES, ConvFeatureEncoder, conv_output_length
from model.weights import load_state_strict, read_hf_folder

IMAGENET_MEAN = (0.485, 0.456, 0.406)     # the normalisation Video Swin's input uses (pixels in [0, 1])
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------------
# Shared pieces

def nearest_code(z, codebook, chunk=4096):
    """Index of the nearest code in squared Euclidean distance.

    z: [..., d], codebook: [K, d] -> ids [...] long. Computed in float32 with autocast off (the ids are
    targets: they must not depend on the caller's precision), as ||z||^2 - 2 z.c + ||c||^2, `chunk` rows
    at a time so that the [rows, K] distance matrix stays small.
    """
    if z.shape[-1] != codebook.shape[-1]:
        raise ValueError(f"vectors have dim {z.shape[-1]} but codes have dim {codebook.shape[-1]}")
    lead = z.shape[:-1]
    with torch.autocast(device_type=z.device.type, enabled=False):
        flat = z.reshape(-1, z.shape[-1]).float()                   # [R, d]
        cb = codebook.float()                                       # [K, d]
        cb_sq = (cb * cb).sum(-1)                                   # [K]
        out = []
        for rows in flat.split(chunk):
            # ||z||^2 is the same for every code: it does not change the argmin, leave it out.
            d = cb_sq[None] - 2.0 * rows @ cb.t()                   # [r, K]
            out.append(d.argmin(-1))
        ids = torch.cat(out) if out else flat.new_zeros(0, dtype=torch.long)
    return ids.view(lead)


def combined_index(ids, vars):
    """fairseq `GumbelVectorQuantizer.to_codebook_index`: ids [..., G] -> [...], sum_i ids_i * vars**(G-1-i).

    For G = 2: i0 * vars + i1, a single id in [0, vars**2). Entries equal to -100 (ignored labels) anywhere
    in a row give -100."""
    G = ids.shape[-1]
    weights = torch.tensor([vars ** (G - 1 - i) for i in range(G)], device=ids.device, dtype=torch.long)
    out = (ids.long() * weights).sum(-1)
    return torch.where((ids == -100).any(-1), torch.full_like(out, -100), out)


class _Frozen(nn.Module):
    """Base class: parameters never get gradients, the module stays in eval mode, forward is no_grad."""

    def _freeze(self):
        self.requires_grad_(False)
        self.eval()
        return self

    def train(self, mode=True):  # a tokenizer has no training mode (no dropout, no Gumbel noise)
        return super().train(False)

    def forward(self, x):
        with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
            return self.tokenize(x)


def _check_video(video, patch):
    if video.dim() != 5 or video.shape[1] != 3:
        raise ValueError(f"video must be [B, 3, T, H, W], got {tuple(video.shape)}")
    H, W = video.shape[-2:]
    if H % patch or W % patch:
        raise ValueError(f"frame size {H}x{W} is not a multiple of the {patch}-pixel token patch")


def _frames(video):
    """[B, 3, T, H, W] -> [B*T, 3, H, W] (each frame is tokenised on its own, appendix A.1)."""
    B, _, T, H, W = video.shape
    return video.transpose(1, 2).reshape(B * T, 3, H, W)


# ----------------------------------------------------------------------------------------------------
# VQGAN-style visual tokenizer (taming-transformers' encoder; PeCo is a VQGAN with a perceptual loss)

@dataclass
class VQGANConfig:
    ch: int = 128                          # base channel count of the encoder
    ch_mult: tuple = (1, 1, 2, 2, 4)       # channel multiplier per resolution level; len - 1 down-samplings
                                           # (4 -> a 16x16 patch per token)
    num_res_blocks: int = 2                # residual blocks per level
    attn_resolutions: tuple = (16,)        # feature-map sizes (relative to `resolution`) that get self-attention
    resolution: int = 256                  # training resolution; only decides where attention blocks sit
    in_channels: int = 3                   # RGB
    z_channels: int = 256                  # channels of conv_out
    double_z: bool = False                 # conv_out emits 2 * z_channels (VAE mean/var); VQGAN: False
    n_embed: int = 8192                    # codebook size (8192 in PeCo, the paper's visual tokenizer)
    embed_dim: int = 256                   # code dimension (quant_conv's output width)
    dropout: float = 0.0                   # unused at inference, kept to read taming configs as they are


def vqgan_config_from_dict(cfg: dict) -> VQGANConfig:
    """Read a VQGAN config.json. Accepts taming-transformers' layout (`{"embed_dim", "n_embed", "ddconfig":
    {...}}`, i.e. `model.params` of its YAML) or the same fields flat. Unknown fields are ignored."""
    flat = dict(cfg.get("ddconfig", {}))
    flat.update({k: v for k, v in cfg.items() if k != "ddconfig"})
    names = {f.name for f in fields(VQGANConfig)}
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in flat.items() if k in names}
    return VQGANConfig(**kw)


class ResnetBlock(nn.Module):
    """GroupNorm(32) -> swish -> conv3x3, twice, plus a (1x1-projected) shortcut (taming `ResnetBlock`)."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.norm1 = nn.GroupNorm(32, c_in, eps=1e-6)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(32, c_out, eps=1e-6)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        if c_in != c_out:
            self.nin_shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions of a feature map, 1x1 convs for q, k, v, out."""

    def __init__(self, c):
        super().__init__()
        self.norm = nn.GroupNorm(32, c, eps=1e-6)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (m(h).flatten(2).transpose(1, 2)[:, None] for m in (self.q, self.k, self.v))  # [B, 1, HW, C]
        h = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Halve the resolution: pad one pixel right and bottom, conv3x3 stride 2 (taming `Downsample`)."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class VQGANEncoder(nn.Module):
    """conv_in -> per level: residual blocks (+ attention) and a down-sampling -> mid (res, attn, res) ->
    GroupNorm, swish, conv_out. [B, 3, H, W] -> [B, z_channels, H/f, W/f], f = 2**(len(ch_mult) - 1)."""

    def __init__(self, c: VQGANConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1)
        in_mult = (1,) + tuple(c.ch_mult)
        res, self.down = c.resolution, nn.ModuleList()
        for i, mult in enumerate(c.ch_mult):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            c_in, c_out = c.ch * in_mult[i], c.ch * mult
            for _ in range(c.num_res_blocks):
                level.block.append(ResnetBlock(c_in, c_out))
                c_in = c_out
                if res in c.attn_resolutions:
                    level.attn.append(AttnBlock(c_in))
            if i != len(c.ch_mult) - 1:
                level.downsample = Downsample(c_in)
                res //= 2
            self.down.append(level)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1, self.mid.block_2 = ResnetBlock(c_in, c_in), AttnBlock(c_in), ResnetBlock(c_in, c_in)
        self.norm_out = nn.GroupNorm(32, c_in, eps=1e-6)
        self.conv_out = nn.Conv2d(c_in, 2 * c.z_channels if c.double_z else c.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)                                  # [B, ch, H, W]
        for level in self.down:
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)                      # halve H, W
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))       # [B, z_channels, H/f, W/f]


class VQGANTokenizer(_Frozen):
    """VQGAN encoder + quant_conv + nearest-code lookup; one id per f x f patch of each frame.

    video [B, 3, T, H, W] (normalised with input_mean/input_std) -> ids [B, T, H/f, W/f] long, f = 16 with
    the default config. The frames go through the encoder in chunks of `frames_per_chunk`.

    Checkpoint layout (taming-transformers `VQModel.state_dict()`, saved as model.safetensors):
        encoder.conv_in.{weight,bias}
        encoder.down.{i}.block.{j}.{norm1,conv1,norm2,conv2,nin_shortcut}.{weight,bias}
        encoder.down.{i}.attn.{j}.{norm,q,k,v,proj_out}.{weight,bias}      (levels at attn_resolutions)
        encoder.down.{i}.downsample.conv.{weight,bias}                      (all but the last level)
        encoder.mid.{block_1,attn_1,block_2}.*, encoder.norm_out.*, encoder.conv_out.*
        quant_conv.{weight,bias}                                            [embed_dim, z_channels, 1, 1]
        quantize.embedding.weight                                           [n_embed, embed_dim]
    `decoder.*`, `post_quant_conv.*` and `loss.*` (the discriminator / LPIPS) are ignored.
    config.json: the fields of `VQGANConfig`, flat or under "ddconfig" as in taming's YAML.
    """

    IGNORE = ("decoder.", "post_quant_conv.", "loss.")

    def __init__(self, config: VQGANConfig = VQGANConfig(), *, input_mean=IMAGENET_MEAN, input_std=IMAGENET_STD,
                 frames_per_chunk=32):
        super().__init__()
        if any(config.ch * m % 32 for m in config.ch_mult):
            raise ValueError(f"GroupNorm(32) needs channel counts divisible by 32, got ch={config.ch}, "
                             f"ch_mult={config.ch_mult}")
        self.config, self.patch, self.frames_per_chunk = config, 2 ** (len(config.ch_mult) - 1), frames_per_chunk
        self.codebook_size = config.n_embed
        self.encoder = VQGANEncoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels if config.double_z else config.z_channels,
                                    config.embed_dim, 1)
        self.quantize = nn.Module()
        self.quantize.embedding = nn.Embedding(config.n_embed, config.embed_dim)
        self.register_buffer("input_mean", torch.tensor(input_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_std", torch.tensor(input_std).view(1, 3, 1, 1), persistent=False)
        self._freeze()

    @classmethod
    def from_pretrained(cls, path, **kw):
        cfg, sd = read_hf_folder(path, vqgan_config_from_dict)
        tok = cls(cfg, **kw)
        load_state_strict(tok, sd, source=path, ignore_prefixes=cls.IGNORE)
        return tok._freeze()

    def tokenize(self, video):
        _check_video(video, self.patch)
        B, _, T, H, W = video.shape
        p = self.quant_conv.weight
        x = _frames(video).to(p)                                       # [B*T, 3, H, W]
        x = (x * self.input_std.to(p) + self.input_mean.to(p)) * 2 - 1  # -> pixels in [-1, 1]
        ids = []
        for chunk in x.split(self.frames_per_chunk):
            z = self.quant_conv(self.encoder(chunk))                   # [b, embed_dim, H/f, W/f]
            ids.append(nearest_code(z.permute(0, 2, 3, 1), self.quantize.embedding.weight))  # [b, H/f, W/f]
        return torch.cat(ids).view(B, T, H // self.patch, W // self.patch)


# ----------------------------------------------------------------------------------------------------
# wav2vec 2.0 quantizer (inference path of fairseq's GumbelVectorQuantizer / HF Wav2Vec2GumbelVectorQuantizer)

@dataclass
class Wav2Vec2QuantizerConfig:
    conv_dim: tuple = (512,) * 7                 # feature-encoder channels
    conv_kernel: tuple = SPEECH_KERNELS          # receptive field 400 samples
    conv_stride: tuple = SPEECH_STRIDES          # stride 320 samples = 20 ms
    conv_bias: bool = False                      # True in the large (LV-60) models
    feat_extract_norm: str = "group"             # "group" (base) or "layer" (large)
    layer_norm_eps: float = 1e-5                 # the feature LayerNorm (HF `feature_projection.layer_norm`)
    num_codevector_groups: int = 2               # G
    num_codevectors_per_group: int = 320         # V: ids per group; combined vocabulary V**G = 102400


def wav2vec2_config_from_hf(cfg: dict) -> Wav2Vec2QuantizerConfig:
    names = {f.name for f in fields(Wav2Vec2QuantizerConfig)}
    return Wav2Vec2QuantizerConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items()
                                      if k in names})


class Wav2Vec2Quantizer(_Frozen):
    """wave [B, N] -> ids [B, T_s, G]: conv feature encoder -> LayerNorm -> weight_proj -> argmax per group.

    This is what `Wav2Vec2ForPreTraining` computes at inference on `extract_features` (the LayerNorm-ed conv
    features, before the feature projection): logits [B, T_s, G * V] viewed as [B, T_s, G, V], argmax over V
    (fairseq takes the same argmax when not training). `combined_ids` gives i0 * V + i1.

    Loads an un-fine-tuned `Wav2Vec2ForPreTraining` checkpoint in the HF layout (e.g. facebook/wav2vec2-base,
    facebook/wav2vec2-large-lv60). Keys used:
        wav2vec2.feature_extractor.conv_layers.{i}.conv.{weight,bias}, ...conv_layers.{i}.layer_norm.*
        wav2vec2.feature_projection.layer_norm.{weight,bias}      -> layer_norm.*
        quantizer.weight_proj.{weight,bias}                       -> weight_proj.*   [G*V, conv_dim[-1]]
    Everything else (Transformer, codevectors, project_q/project_hid) is ignored.
    """

    def __init__(self, config: Wav2Vec2QuantizerConfig = Wav2Vec2QuantizerConfig()):
        super().__init__()
        self.config = config
        self.groups, self.vars = config.num_codevector_groups, config.num_codevectors_per_group
        self.feature_extractor = ConvFeatureEncoder(config.conv_dim, config.conv_kernel, config.conv_stride,
                                                    config.conv_bias, config.feat_extract_norm)
        self.layer_norm = nn.LayerNorm(config.conv_dim[-1], eps=config.layer_norm_eps)
        self.weight_proj = nn.Linear(config.conv_dim[-1], self.groups * self.vars)
        self._freeze()

    @staticmethod
    def convert_hf_state_dict(sd: dict, source="checkpoint") -> dict:
        if "quantizer.weight_proj.weight" not in sd:
            raise KeyError(f"{source}: no quantizer (quantizer.weight_proj.weight missing). Fine-tuned wav2vec 2.0 "
                           f"checkpoints (Wav2Vec2ForCTC, e.g. facebook/wav2vec2-base-960h) drop the quantizer; use "
                           f"an un-fine-tuned Wav2Vec2ForPreTraining one (e.g. facebook/wav2vec2-base).")
        rename = (("wav2vec2.feature_extractor.", "feature_extractor."),
                  ("wav2vec2.feature_projection.layer_norm.", "layer_norm."),
                  ("quantizer.weight_proj.", "weight_proj."))
        out = {}
        for k, v in sd.items():
            for old, new in rename:
                if k.startswith(old):
                    out[new + k[len(old):]] = v
        return out

    @classmethod
    def from_pretrained(cls, path):
        cfg, sd = read_hf_folder(path, wav2vec2_config_from_hf)
        q = cls(cfg)
        load_state_strict(q, cls.convert_hf_state_dict(sd, path), source=path)
        return q._freeze()

    def tokenize(self, wave):
        if wave.dim() != 2:
            raise ValueError(f"wave must be [B, N], got {tuple(wave.shape)}")
        p = self.weight_proj.weight
        if conv_output_length(wave.shape[1], self.config.conv_kernel, self.config.conv_stride) < 1:
            return torch.zeros(wave.shape[0], 0, self.groups, dtype=torch.long, device=wave.device)
        feats = self.feature_extractor(wave.to(p)).transpose(1, 2)   # [B, T_s, C]
        logits = self.weight_proj(self.layer_norm(feats))             # [B, T_s, G * V]
        return logits.view(*logits.shape[:2], self.groups, self.vars).argmax(-1)  # [B, T_s, G]

    def combined_ids(self, wave):
        return combined_index(self(wave), self.vars)                 # [B, T_s] in [0, V**G)


# ----------------------------------------------------------------------------------------------------
# Random-projection tokenizers (BEST-RQ, Chiu et al. 2022)

def _random_projection(seed, d_in, d_out, K, groups=1):
    """Seeded, device-independent draws (CPU generator): Xavier-uniform projections [G, d_in, d_out] and
    Gaussian codebooks normalised to unit length [G, K, d_out], as in BEST-RQ section 3.1."""
    g = torch.Generator().manual_seed(seed)
    bound = math.sqrt(6.0 / (d_in + d_out))
    proj = (torch.rand(groups, d_in, d_out, generator=g) * 2 - 1) * bound
    codes = F.normalize(torch.randn(groups, K, d_out, generator=g), dim=-1)
    return proj, codes


def _standardise(x, eps=1e-5):
    """Zero mean, unit variance over the last axis. Per vector (patch or speech frame), not per data set:
    an id then depends on its own patch / frame only, never on the batch or its padding."""
    x = x - x.mean(-1, keepdim=True)
    return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()


class RandomProjectionVideoTokenizer(_Frozen):
    """BEST-RQ for frames: each patch x patch RGB patch (768 values) is standardised, projected by a frozen
    random matrix to `dim`, L2-normalised, and given the id of the nearest frozen random unit code.

    video [B, 3, T, H, W] -> ids [B, T, H/patch, W/patch]. Buffers are not saved in state_dict: the seed
    rebuilds them exactly (CPU generator), in any process and on any device.
    """

    def __init__(self, codebook_size=8192, dim=16, patch=16, seed=0):
        super().__init__()
        self.codebook_size, self.dim, self.patch, self.seed = codebook_size, dim, patch, seed
        proj, codes = _random_projection(seed, 3 * patch * patch, dim, codebook_size)
        self.register_buffer("proj", proj[0], persistent=False)      # [3*p*p, dim]
        self.register_buffer("codebook", codes[0], persistent=False)  # [K, dim], unit rows
        self._freeze()

    def tokenize(self, video):
        _check_video(video, self.patch)
        B, _, T, H, W = video.shape
        p, h, w = self.patch, H // self.patch, W // self.patch
        x = _frames(video).float().view(B * T, 3, h, p, w, p)
        x = x.permute(0, 2, 4, 1, 3, 5).reshape(B, T, h, w, 3 * p * p)  # [B, T, h, w, 3*p*p]
        z = F.normalize(_standardise(x) @ self.proj, dim=-1)             # [B, T, h, w, dim]
        return nearest_code(z, self.codebook)                            # [B, T, h, w]


def mel_filterbank(n_fft=400, n_mels=80, sr=16000, f_min=0.0, f_max=8000.0):
    """HTK-style triangular mel filters [n_fft // 2 + 1, n_mels] (no area normalisation)."""
    mel = lambda f: 2595.0 * math.log10(1.0 + f / 700.0)
    pts = torch.linspace(mel(f_min), mel(f_max), n_mels + 2, dtype=torch.float64)
    hz = 700.0 * (10 ** (pts / 2595.0) - 1.0)                      # [n_mels + 2] band edges
    freqs = torch.linspace(0, sr / 2, n_fft // 2 + 1, dtype=torch.float64)
    lo, mid, hi = hz[:-2], hz[1:-1], hz[2:]
    up = (freqs[:, None] - lo) / (mid - lo)
    down = (hi - freqs[:, None]) / (hi - mid)
    return up.clamp(min=0).minimum(down.clamp(min=0)).float()


class RandomProjectionSpeechTokenizer(_Frozen):
    """BEST-RQ for speech at the speech encoder's 20 ms frame rate; `groups` independent codebooks.

    wave [B, N] -> ids [B, T_s, G], T_s = conv_output_length(N, SPEECH_KERNELS, SPEECH_STRIDES).
    Frame t of the speech encoder sees samples [320 t, 320 t + 400). The tokenizer's frame t:
      features="logmel" (default, as BEST-RQ): 80 log-mel bands, 25 ms window, 10 ms hop; mel frames 2t and
          2t+1 stacked (160 values), i.e. samples [320 t, 320 t + 560) (the wave is zero-padded by 160
          samples at the end so the last frame has its pair);
      features="wave": the 400 samples [320 t, 320 t + 400) themselves, the conv encoder's receptive field.
    Each stacked vector is standardised on its own, projected by G frozen random matrices to `dim`,
    L2-normalised, and matched to the nearest of `codebook_size` unit codes per group.
    """

    def __init__(self, codebook_size=320, groups=2, seed=0, *, dim=16, features="logmel", n_mels=80):
        super().__init__()
        if features not in ("logmel", "wave"):
            raise ValueError(f"features must be 'logmel' or 'wave', got {features!r}")
        self.codebook_size, self.groups, self.vars, self.dim, self.seed = codebook_size, groups, codebook_size, dim, seed
        self.features = features
        d_in = 2 * n_mels if features == "logmel" else 400
        proj, codes = _random_projection(seed, d_in, dim, codebook_size, groups)
        self.register_buffer("proj", proj, persistent=False)          # [G, d_in, dim]
        self.register_buffer("codebook", codes, persistent=False)     # [G, K, dim]
        self.register_buffer("window", torch.hann_window(400, periodic=True), persistent=False)
        self.register_buffer("mel", mel_filterbank(n_mels=n_mels), persistent=False)  # [201, n_mels]
        self.d_in = d_in
        self._freeze()

    def frames(self, wave):
        """wave [B, N] -> stacked feature vectors [B, T_s, d_in] (float32)."""
        B, N = wave.shape
        T_s = max(int(conv_output_length(N, SPEECH_KERNELS, SPEECH_STRIDES)), 0)
        wave = wave.float()
        if T_s == 0:                                                 # shorter than one 400-sample window
            return wave.new_zeros(B, 0, self.d_in)
        if self.features == "wave":
            return wave[:, :320 * (T_s - 1) + 400].unfold(1, 400, 320)  # [B, T_s, 400]
        need = 320 * (T_s - 1) + 560                                 # samples for 2 T_s mel frames
        x = F.pad(wave, (0, max(need - N, 0)))[:, :need]
        spec = torch.stft(x, 400, hop_length=160, window=self.window, center=False,
                          return_complex=True).abs().pow(2)          # [B, 201, 2 T_s]
        logmel = (spec.transpose(1, 2) @ self.mel).clamp(min=1e-10).log()  # [B, 2 T_s, n_mels]
        return logmel[:, :2 * T_s].reshape(B, T_s, -1)               # [B, T_s, 2 n_mels]

    def tokenize(self, wave):
        if wave.dim() != 2:
            raise ValueError(f"wave must be [B, N], got {tuple(wave.shape)}")
        x = _standardise(self.frames(wave))                          # [B, T_s, d_in]
        z = F.normalize(torch.einsum("btd,gde->btge", x, self.proj), dim=-1)  # [B, T_s, G, dim]
        return torch.stack([nearest_code(z[:, :, g], self.codebook[g]) for g in range(self.groups)], -1)

    def combined_ids(self, wave):
        return combined_index(self(wave), self.vars)


# ----------------------------------------------------------------------------------------------------
# Entry points

def load_quantizer(kind, path, **kw):
    """A frozen tokenizer from a Hugging Face-style folder (config.json + model.safetensors).
    kind "wav2vec2": `Wav2Vec2Quantizer`, wave [B, N] -> ids [B, T_s, G];
    kind "vqgan": `VQGANTokenizer`, video [B, 3, T, H, W] -> ids [B, T, H/16, W/16]."""
    if kind == "wav2vec2":
        return Wav2Vec2Quantizer.from_pretrained(path)
    if kind == "vqgan":
        return VQGANTokenizer.from_pretrained(path, **kw)
    raise ValueError(f"kind must be 'wav2vec2' or 'vqgan', got {kind!r}")


def build_default_quantizers(seed=0, video_codebook_size=8192, speech_codebook_size=320, speech_groups=2, *,
                             dim=16, speech_features="logmel"):
    """The random-projection pair used when no tokenizer weights are given: (video, speech) tokenizers.
    Defaults mirror the paper's targets: 8192 visual codes (PeCo), 2 groups of 320 speech codes (wav2vec 2.0).
    The speech tokenizer uses seed + 1 so the two never share random draws."""
    video = RandomProjectionVideoTokenizer(video_codebook_size, dim=dim, patch=16, seed=seed)
    speech = RandomProjectionSpeechTokenizer(speech_codebook_size, speech_groups, seed + 1, dim=dim,
                                             features=speech_features)
    return video, speech


def fingerprint(*tokenizers, settings=None):
    """A 16-hex-digit hash of tokenizers' classes, settings (their simple attributes and config), every
    parameter and buffer, and `settings` (a dict of what else decides their ids, e.g. the input normalisation):
    two tokenizer sets with the same fingerprint compute the same ids. `python -m pipeline tokenize` writes it beside an
    offline target cache and train.py compares it with the model's own, so targets of two tokenizers never mix."""
    h = hashlib.sha256(repr(sorted((settings or {}).items())).encode())
    for tok in tokenizers:
        h.update(type(tok).__qualname__.encode())
        h.update(repr({k: v for k, v in sorted(vars(tok).items()) if not k.startswith("_") and k != "training"
                       and isinstance(v, (bool, int, float, str, tuple))}).encode())
        if dataclasses.is_dataclass(getattr(tok, "config", None)):
            h.update(repr(dataclasses.asdict(tok.config)).encode())
        for name, t in sorted([*tok.named_parameters(), *tok.named_buffers()], key=lambda kv: kv[0]):
            h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
