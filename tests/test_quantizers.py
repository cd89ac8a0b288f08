"""Tests for model/quantizers.py: nearest-code lookup, wav2vec 2.0 quantizer parity with transformers,
VQGAN tokenizer shapes and loading errors, frame alignment, BEST-RQ determinism and codebook usage.

`python tests/test_quantizers.py` prints the codebook shares on natural-looking synthetic inputs."""
import hashlib
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]   # also as a script, and imported by a subprocess below

from common import SMALL_VQ, hf_wav2vec2_config, save_vq  # noqa: E402

from model.quantizers import (  # noqa: E402
    SPEECH_KERNELS,
    SPEECH_STRIDES,
    RandomProjectionSpeechTokenizer,
    VQGANTokenizer,
    Wav2Vec2Quantizer,
    Wav2Vec2QuantizerConfig,
    build_default_quantizers,
    combined_index,
    fingerprint,
    load_quantizer,
    nearest_code,
)
from model.wavlm import ConvFeatureEncoder, conv_output_length  # noqa: E402

# ----------------------------------------------------------------------------------------------------
# Natural-looking synthetic inputs (no data sets offline)

def pink_video(B, T, H, W, seed=0):
    """Frames with a 1/f amplitude spectrum (natural-image statistics), a shared luminance plus weaker
    chroma, and slow drift over time; ImageNet-normalised like the vision encoder's input."""
    g = torch.Generator().manual_seed(seed)
    fy = torch.fft.fftfreq(H)[:, None]
    fx = torch.fft.rfftfreq(W)[None, :]
    amp = 1.0 / (fy ** 2 + fx ** 2).sqrt().clamp(min=1.0 / max(H, W))

    def field(*lead):
        z = torch.randn(*lead, H, W // 2 + 1, generator=g) + 1j * torch.randn(*lead, H, W // 2 + 1, generator=g)
        f = torch.fft.irfft2(z * amp, s=(H, W))
        return f / f.flatten(-2).std(-1)[..., None, None]

    base = field(B, 1)                                            # [B, 1, H, W] scene
    drift = field(B, T)                                           # per-frame changes
    lum = base + 0.3 * drift                                      # [B, T, H, W]
    chroma = 0.3 * field(B, 3)[:, :, None]                        # [B, 3, 1, H, W]
    rgb = (0.5 + 0.15 * (lum[:, None] + chroma)).clamp(0, 1)      # [B, 3, T, H, W] in [0, 1]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1, 1)
    return (rgb - mean) / std


def speech_like(B, seconds, seed=0, sr=16000):
    """Segments of 50-250 ms: voiced (harmonics of a gliding f0 under three random formants), fricative
    (high-passed noise) or near-silence, with random loudness. numpy: one vector op per segment."""
    rng = np.random.default_rng(seed)
    n_total = int(seconds * sr)
    out = np.zeros((B, n_total))
    h = np.arange(1, 40)[:, None]                                   # harmonic numbers
    for b in range(B):
        pos = 0
        while pos < n_total:
            n = min(int(sr * rng.uniform(0.05, 0.25)), n_total - pos)
            kind = rng.random()
            if kind < 0.6:
                f0 = rng.uniform(90, 250) + rng.uniform(0, 30) * np.linspace(0, 1, n)   # gliding pitch
                formants = np.array([rng.uniform(300, 900), rng.uniform(900, 2500), rng.uniform(2500, 3500)])
                fh = h * f0.mean()                                  # [39, 1]
                amp = np.exp(-((fh - formants) / 120.0) ** 2).sum(-1, keepdims=True) + 0.02 / h
                amp = amp * (fh < sr / 2 - 200)
                phase = np.cumsum(2 * np.pi * f0 / sr)              # [n]
                seg = (amp * np.sin(h * phase + rng.uniform(0, 2 * np.pi, (39, 1)))).sum(0)
            elif kind < 0.85:
                noise = rng.standard_normal(n + 1)
                seg = noise[1:] - 0.9 * noise[:-1]
            else:
                seg = 0.01 * rng.standard_normal(n)
            out[b, pos:pos + n] = seg * np.hanning(n) * 10 ** (-rng.uniform(0, 1.5))
            pos += n
    return torch.from_numpy(0.1 * out / np.abs(out).max()).float()


def _share(ids, K):
    return ids.unique().numel() / K


# ----------------------------------------------------------------------------------------------------
# Nearest-code lookup

def _brute_force(z, cb):
    return ((z.float()[..., None, :] - cb.float()) ** 2).sum(-1)    # [..., K] squared distances


@pytest.mark.parametrize("autocast", [False, True])
def test_nearest_code_equals_brute_force(autocast):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 50, 16, generator=g)
    cb = torch.randn(512, 16, generator=g)
    d = _brute_force(z, cb)                                         # [3, 50, 512]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        ids = nearest_code(z, cb)
    assert ids.shape == (3, 50) and ids.dtype == torch.long
    ref = d.argmin(-1)
    # Ties aside: where the two disagree, both codes must be equally near up to float32 rounding.
    differ = ids != ref
    chosen = d.gather(-1, ids[..., None])[..., 0]
    best = d.gather(-1, ref[..., None])[..., 0]
    assert torch.allclose(chosen[differ], best[differ], rtol=1e-5, atol=1e-5)
    assert differ.float().mean() < 0.01


def test_nearest_code_bf16_inputs_use_float32():
    """bf16 vectors and codes: the lookup upcasts, so it equals the brute force on the upcast values."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(400, 8, generator=g).bfloat16()
    cb = torch.randn(64, 8, generator=g).bfloat16()
    d = _brute_force(z, cb)
    ids = nearest_code(z, cb)
    ref = d.argmin(-1)
    differ = ids != ref
    assert torch.allclose(d.gather(-1, ids[:, None]), d.gather(-1, ref[:, None]), rtol=1e-5, atol=1e-5)
    assert differ.float().mean() < 0.01


def test_combined_index():
    ids = torch.tensor([[0, 0], [1, 2], [319, 319], [-100, -100], [5, -100], [-100, 7]])
    assert combined_index(ids, 320).tolist() == [0, 322, 320 * 320 - 1, -100, -100, -100]   # -100 in any group
    three = torch.tensor([[1, 2, 3], [1, -100, 3]])                                           # G = 3: base vars
    assert combined_index(three, 10).tolist() == [123, -100]


# ----------------------------------------------------------------------------------------------------
# wav2vec 2.0 quantizer vs transformers

@pytest.mark.parametrize("norm,bias", [("group", False), ("layer", True)])
def test_wav2vec2_quantizer_matches_transformers(tmp_path, norm, bias):
    from transformers import Wav2Vec2ForPreTraining
    torch.manual_seed(0)
    hf = Wav2Vec2ForPreTraining(hf_wav2vec2_config(norm, bias)).eval()
    hf.save_pretrained(tmp_path)                                     # config.json + model.safetensors
    assert os.path.isfile(tmp_path / "model.safetensors")
    q = load_quantizer("wav2vec2", str(tmp_path))
    assert not any(p.requires_grad for p in q.parameters())
    for n in (400, 1234, 16000, 16001, 20479):
        wave = torch.randn(2, n, generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            ef = hf.wav2vec2(wave).extract_features                   # [B, T_s, C] (LayerNorm-ed conv features)
            logits = hf.quantizer.weight_proj(ef).view(2, ef.shape[1], 2, 40)
        ref = logits.argmax(-1)                                       # [B, T_s, 2]
        ids = q(wave)
        assert ids.shape == ref.shape == (2, conv_output_length(n, SPEECH_KERNELS, SPEECH_STRIDES), 2)
        assert torch.equal(ids, ref)
        assert torch.equal(q.combined_ids(wave), ref[..., 0] * 40 + ref[..., 1])
    # Same path as HF's eval-mode quantizer: its codevectors are those of our ids.
    with torch.no_grad():
        ef = hf.wav2vec2(wave).extract_features
        cv, _ = hf.quantizer(ef)
        idx = ids + torch.tensor([0, 40])
        ours = hf.quantizer.codevectors[0][idx].flatten(-2)
    assert torch.allclose(cv, ours)


def test_wav2vec2_fine_tuned_checkpoint_is_refused(tmp_path):
    from transformers import Wav2Vec2ForCTC
    Wav2Vec2ForCTC(hf_wav2vec2_config("group", False)).save_pretrained(tmp_path)
    with pytest.raises(KeyError, match="Wav2Vec2ForPreTraining"):
        load_quantizer("wav2vec2", str(tmp_path))


def test_load_quantizer_bad_kind():
    with pytest.raises(ValueError, match="kind"):
        load_quantizer("peco", "/nonexistent")


# ----------------------------------------------------------------------------------------------------
# Speech frames line up with the speech encoder's frames

def test_speech_frames_align_with_encoder():
    enc = ConvFeatureEncoder((8,) * 7, SPEECH_KERNELS, SPEECH_STRIDES, False, "group")
    w2v = Wav2Vec2Quantizer(Wav2Vec2QuantizerConfig(conv_dim=(8,) * 7, num_codevectors_per_group=8))
    toks = [RandomProjectionSpeechTokenizer(32, 2, seed=0, features=f) for f in ("logmel", "wave")] + [w2v]
    lengths = list(range(400, 3000, 37)) + [399, 401, 719, 720, 721, 15999, 16000, 16001, 16159, 16160, 48123]
    for n in lengths:
        wave = torch.randn(1, n)
        with torch.no_grad():
            t_enc = enc(wave).shape[-1] if n >= 400 else 0
        assert t_enc == max(conv_output_length(n, SPEECH_KERNELS, SPEECH_STRIDES), 0) == max((n - 400) // 320 + 1, 0)
        for tok in toks:
            assert tok(wave).shape == (1, t_enc, 2), (type(tok).__name__, n)


def test_speech_tokenizer_frame_depends_only_on_its_window():
    """Frame t's id depends only on samples [320 t, 320 t + 560): appending samples or zero padding never
    changes earlier ids (offline tokenisation of a sample alone equals tokenisation inside a padded batch)."""
    tok = RandomProjectionSpeechTokenizer(320, 2, seed=3)
    wave = speech_like(1, 1.0, seed=5)
    ids = tok(wave)
    longer = tok(torch.cat([wave, torch.randn(1, 3333)], 1))
    assert torch.equal(longer[:, :ids.shape[1] - 1], ids[:, :-1])     # the last frame saw the zero padding
    padded = tok(torch.cat([wave, torch.zeros(1, 5000)], 1))
    assert torch.equal(padded[:, :ids.shape[1]], ids)


# ----------------------------------------------------------------------------------------------------
# VQGAN tokenizer

@pytest.mark.parametrize("T,H,W", [(1, 64, 64), (2, 32, 96), (3, 112, 80)])
def test_vqgan_shapes(T, H, W):
    torch.manual_seed(0)
    tok = VQGANTokenizer(SMALL_VQ)
    ids = tok(torch.randn(2, 3, T, H, W))
    assert ids.shape == (2, T, H // 16, W // 16) and ids.dtype == torch.long
    assert 0 <= ids.min() and ids.max() < 128


def test_vqgan_frames_independent_and_lookup():
    """Frames share one encoder batch (the default chunk of 32 frames) yet are tokenised each on its own."""
    torch.manual_seed(0)
    tok = VQGANTokenizer(SMALL_VQ)
    video = pink_video(1, 3, 48, 64, seed=2)
    ids = tok(video)
    assert torch.equal(tok(video[:, :, 1:2]), ids[:, 1:2])
    # The ids are the nearest codes of quant_conv(encoder(pixels in [-1, 1])), by brute force.
    frame = video[0, :, 0]
    x = (frame * tok.input_std[0] + tok.input_mean[0]) * 2 - 1
    with torch.no_grad():
        z = tok.quant_conv(tok.encoder(x[None]))[0].permute(1, 2, 0)  # [3, 4, 8]
    ref = _brute_force(z, tok.quantize.embedding.weight).argmin(-1)
    assert torch.equal(ids[0, 0], ref)


def test_vqgan_encoder_matches_taming_transformers():
    """Parity with taming-transformers' own Encoder (installed by .ci/run with --no-deps: its declared
    dependencies pull torchvision and Lightning; this module imports torch and numpy only), in the key layout a
    VQGAN checkpoint has, and with its stride-2 downsampling's asymmetric (0, 1, 0, 1) padding."""
    taming = pytest.importorskip("taming.modules.diffusionmodules.model",
                                 reason="taming-transformers not installed (.ci/run installs it with --no-deps)")
    torch.manual_seed(0)
    c = SMALL_VQ
    ref = taming.Encoder(ch=c.ch, out_ch=3, ch_mult=c.ch_mult, num_res_blocks=c.num_res_blocks,
                         attn_resolutions=c.attn_resolutions, in_channels=3, resolution=c.resolution,
                         z_channels=c.z_channels, double_z=False).eval()
    quant_conv = torch.nn.Conv2d(c.z_channels, c.embed_dim, 1)
    codebook = torch.nn.Embedding(c.n_embed, c.embed_dim)
    sd = {f"encoder.{k}": v for k, v in ref.state_dict().items()}
    sd.update({f"quant_conv.{k}": v for k, v in quant_conv.state_dict().items()})
    sd["quantize.embedding.weight"] = codebook.weight.detach()
    tok = VQGANTokenizer(c)
    tok.load_state_dict(sd, strict=True)
    x = torch.rand(2, 3, 48, 80) * 2 - 1                          # pixels in [-1, 1], as taming's VQGAN takes
    with torch.no_grad():
        z = quant_conv(ref(x))                                    # [2, embed_dim, 3, 5]
        assert torch.allclose(tok.quant_conv(tok.encoder(x)), z, atol=1e-5)
        want = _brute_force(z.permute(0, 2, 3, 1), codebook.weight).argmin(-1)   # taming's VectorQuantizer
        video = ((x + 1) / 2 - tok.input_mean[0]) / tok.input_std[0]          # the normalised frames we take
        ids = tok(video.unsqueeze(2))                             # [2, 1, 3, 5]
    assert torch.equal(ids[:, 0], want)


def test_vqgan_load_roundtrip_and_errors(tmp_path):
    torch.manual_seed(0)
    tok = VQGANTokenizer(SMALL_VQ)
    sd = dict(tok.state_dict())
    sd["decoder.conv_in.weight"] = torch.zeros(1)                   # ignored prefixes load silently
    sd["post_quant_conv.weight"] = torch.zeros(1)
    save_vq(tmp_path / "ok", tok, sd)
    loaded = load_quantizer("vqgan", str(tmp_path / "ok"))
    video = torch.randn(1, 3, 2, 32, 48)
    assert torch.equal(loaded(video), tok(video))
    assert loaded.config == SMALL_VQ

    bad = dict(tok.state_dict())
    del bad["encoder.down.1.block.0.conv1.weight"]
    save_vq(tmp_path / "missing", tok, bad, nested=False)
    named = (re.escape(str(tmp_path / "missing")) +
             r".*: missing tensor\(s\) \[.*encoder\.down\.1\.block\.0\.conv1\.weight")
    with pytest.raises(KeyError, match=named):
        load_quantizer("vqgan", str(tmp_path / "missing"))

    bad = dict(tok.state_dict())
    bad["quantize.embedding.weight"] = torch.zeros(64, 8)
    save_vq(tmp_path / "shape", tok, bad)
    with pytest.raises(ValueError, match=r"quantize\.embedding\.weight.*\(64, 8\).*\(128, 8\)"):
        load_quantizer("vqgan", str(tmp_path / "shape"))


def test_vqgan_rejects_bad_sizes():
    tok = VQGANTokenizer(SMALL_VQ)
    with pytest.raises(ValueError, match="multiple of the 16-pixel"):
        tok(torch.randn(1, 3, 1, 40, 32))
    with pytest.raises(ValueError, match=r"\[B, 3, T, H, W\]"):
        tok(torch.randn(1, 3, 32, 32))


# ----------------------------------------------------------------------------------------------------
# Random-projection tokenizers (BEST-RQ)

def test_random_projection_frozen_and_device_ready():
    v, s = build_default_quantizers(seed=0)
    for m in (v, s):
        assert not any(p.requires_grad for p in m.parameters())
        assert len(list(m.buffers())) > 0 and m.state_dict() == {}   # rebuilt from the seed, not saved
        m.train()
        assert not m.training
    ids = v(pink_video(1, 2, 64, 64))
    assert ids.shape == (1, 2, 4, 4) and not ids.requires_grad


def test_random_projection_speech_ids_against_numpy():
    """The log-mel BEST-RQ speech tokenizer as its docstring describes it, in float64 numpy: periodic Hann
    400, hop 160, power spectrum, 80 HTK mel bands over 0-8 kHz, log, mel frames 2t and 2t+1 stacked,
    standardised, projected per group, L2-normalised, nearest code of that group's codebook by explicit
    distances. At most one id of ~800 may differ (a float32 near-tie); a missing log, a wrong window, band
    edge, normalisation axis or codebook moves 1-55% of them."""
    _, s = build_default_quantizers(seed=3, speech_codebook_size=64)
    wave = speech_like(1, 4.0, seed=2).float()
    ids = s(wave)[0].numpy()                                             # [T_s, G]
    T_s, G = ids.shape
    x = np.pad(wave[0].double().numpy(), (0, 160))
    win = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 400)
    power = np.abs(np.fft.rfft(np.stack([x[160 * j:160 * j + 400] * win for j in range(2 * T_s)]), axis=1)) ** 2
    mel = lambda f: 2595 * np.log10(1 + f / 700)
    edges = 700 * (10 ** (np.linspace(mel(0), mel(8000), 82) / 2595) - 1)
    freqs = np.linspace(0, 8000, 201)
    bank = np.stack([np.clip(np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)), 0, None)
                     for lo, mid, hi in zip(edges, edges[1:], edges[2:])], 1)   # [201, 80]
    feats = np.log(np.maximum(power @ bank, 1e-10)).reshape(T_s, 160)
    feats = (feats - feats.mean(1, keepdims=True)) / np.sqrt(feats.var(1, keepdims=True) + 1e-5)
    want = np.zeros_like(ids)
    for g in range(G):
        z = feats @ s.proj[g].double().numpy()
        z /= np.linalg.norm(z, axis=1, keepdims=True)
        c = s.codebook[g].double().numpy()
        want[:, g] = (((z[:, None, :] - c[None]) ** 2).sum(-1)).argmin(1)
    assert T_s == 199 and (ids != want).sum() <= 1, (ids != want).sum()


def test_random_projection_draws():
    """BEST-RQ 3.1: Xavier-uniform projections on [-b, b], b = sqrt(6 / (d_in + d_out)), zero mean; unit
    Gaussian codes. The speech tokenizer draws with seed + 1, the video one with seed: no shared draws."""
    from model.quantizers import _random_projection
    proj, codes = _random_projection(0, 160, 16, 320, groups=2)
    b = math.sqrt(6 / (160 + 16))
    assert proj.abs().max() <= b and proj.min() < -0.99 * b and proj.max() > 0.99 * b
    assert abs(proj.mean().item()) < 0.02 * b                   # 5120 draws: std of the mean ~0.008 b
    assert torch.allclose(codes.norm(dim=-1), torch.ones(2, 320))
    v, s = build_default_quantizers(seed=4)
    assert (v.seed, s.seed) == (4, 5)
    assert not torch.equal(s.proj[0, :16].flatten()[:48], v.proj.flatten()[:48])


def test_tokenizers_ignore_the_callers_autocast():
    """train.py computes targets inside bf16 autocast: the ids are those of float32."""
    v, s = build_default_quantizers(seed=0, video_codebook_size=256)
    video, wave = pink_video(1, 2, 64, 64), speech_like(2, 2.0).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = v(video), s(wave)
    assert torch.equal(low[0], v(video)) and torch.equal(low[1], s(wave))


def test_fingerprint_follows_what_the_tokenizers_compute():
    """Two builds of the same tokenizers share a fingerprint; one changed code, a changed setting or the
    pair's order gives another (the check train.py makes on offline target caches)."""
    v, s = build_default_quantizers(seed=0, video_codebook_size=64)
    fp = fingerprint(v, s)
    assert fingerprint(v, s, settings={"normalize_audio": True}) != fingerprint(v, s,
                                                                                settings={"normalize_audio": False})
    w = Wav2Vec2Quantizer(Wav2Vec2QuantizerConfig(num_codevectors_per_group=8))
    eps = Wav2Vec2Quantizer(Wav2Vec2QuantizerConfig(num_codevectors_per_group=8, layer_norm_eps=1e-3))
    eps.load_state_dict(w.state_dict())   # the same tensors; a setting only the config holds
    assert fingerprint(w) != fingerprint(eps)
    assert re.fullmatch("[0-9a-f]{16}", fp) and fingerprint(*build_default_quantizers(0, 64)) == fp
    assert fingerprint(s, v) != fp and fingerprint(v) != fp
    kept = v.codebook[7, 3].item()
    v.codebook[7, 3] += 1e-3                       # one coordinate of one code: ids of some patches move
    assert fingerprint(v, s) != fp
    v.codebook[7, 3] = kept
    assert fingerprint(v, s) == fp
    s.features = "other"                           # a setting outside the tensors
    assert fingerprint(v, s) != fp


def test_random_projection_video_ids_from_their_own_patch():
    """Brute force through F.unfold: patch (t, i, j) of the frame, standardised, projected, normalised, nearest
    code by explicit distances; on a non-square frame so that rows and columns cannot be confused."""
    v, _ = build_default_quantizers(seed=0, video_codebook_size=256)
    video = pink_video(2, 3, 48, 80, seed=3)                             # [B, 3, T, H, W]
    ids = v(video)                                                       # [B, T, 3, 5]
    B, _, T, H, W = video.shape
    frames = video.transpose(1, 2).reshape(B * T, 3, H, W)
    patches = torch.nn.functional.unfold(frames, 16, stride=16).transpose(1, 2)   # [B*T, 3*5, 3*16*16]
    x = (patches - patches.mean(-1, keepdim=True))
    x = x / (x.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
    z = torch.nn.functional.normalize(x @ v.proj, dim=-1)
    want = torch.cdist(z, v.codebook[None].expand(B * T, -1, -1)).argmin(-1)    # [B*T, 15]
    assert torch.equal(ids.reshape(B * T, -1), want)


_SNIPPET = r"""
import hashlib, sys, torch
sys.path.insert(0, {root!r})
from model.quantizers import build_default_quantizers
from tests.test_quantizers import pink_video, speech_like
v, s = build_default_quantizers(seed=7, video_codebook_size=1024, speech_codebook_size=64)
a = v(pink_video(1, 2, 64, 96, seed=1)); b = s(speech_like(2, 0.5, seed=1))
print(hashlib.sha256(a.numpy().tobytes() + b.numpy().tobytes()).hexdigest())
"""


def test_random_projection_same_seed_same_ids_across_processes():
    v, s = build_default_quantizers(seed=7, video_codebook_size=1024, speech_codebook_size=64)
    a, b = v(pink_video(1, 2, 64, 96, seed=1)), s(speech_like(2, 0.5, seed=1))
    here = hashlib.sha256(a.numpy().tobytes() + b.numpy().tobytes()).hexdigest()
    v2, s2 = build_default_quantizers(seed=7, video_codebook_size=1024, speech_codebook_size=64)
    assert torch.equal(v2(pink_video(1, 2, 64, 96, seed=1)), a)
    out = subprocess.run([sys.executable, "-c", _SNIPPET.format(root=ROOT)], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == here
    v3, _ = build_default_quantizers(seed=8, video_codebook_size=1024, speech_codebook_size=64)
    assert not torch.equal(v3(pink_video(1, 2, 64, 96, seed=1)), a)


def codebook_shares(seed=0):
    """Share of the codebook used on natural-looking synthetic data with the default sizes.
    Video: 64 frames of 256 x 256 (16,384 patches, 2 per code) against 8192 codes.
    Speech: 4 x 20 s (3,996 frames, 12.5 per code) against 2 groups of 320 codes."""
    v, s = build_default_quantizers(seed=seed)
    vid = v(pink_video(4, 16, 256, 256, seed=seed))
    wave = speech_like(4, 20.0, seed=seed)
    sp = s(wave)
    _, s_wave = build_default_quantizers(seed=seed, speech_features="wave")
    spw = s_wave(wave)
    return {"video": _share(vid, 8192),
            "speech_logmel": [_share(sp[..., g], 320) for g in range(2)],
            "speech_wave": [_share(spw[..., g], 320) for g in range(2)],
            "video_uniform_expectation": 1 - math.exp(-vid.numel() / 8192)}


def test_random_projection_uses_a_large_share_of_the_codebook():
    shares = codebook_shares()
    print(shares)
    # Measured (seed 0): video 0.39 (a uniform draw of 16,384 ids from 8192 codes would cover 1 - e^-2 = 0.86;
    # 1/f patches are far from isotropic after a 16-d projection: perplexity ~1800), log-mel speech 0.50 / 0.61,
    # waveform speech 1.0 / 1.0. The thresholds leave a margin of about a quarter below the measured values.
    assert shares["video"] > 0.3
    assert min(shares["speech_logmel"]) > 0.4 and min(shares["speech_wave"]) > 0.75


if __name__ == "__main__":
    print(codebook_shares())
