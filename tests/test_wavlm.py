"""model/wavlm.py against Hugging Face WavLMModel / HubertModel (small random configs, CPU, float32)."""
import dataclasses
import json
import os
import re

import pytest
import torch
from common import assert_attention_dropout_only_in_training, assert_same_function, perturbed
from safetensors.torch import load_file, save_file

from model.wavlm import (HUBERT_LARGE, WAVLM_LARGE, ConvFeatureEncoder, SpeechConfig, SpeechEncoder, config_from_hf,
                         conv_output_length, convert_hf_state_dict, hf_config, load_speech_encoder, save_hf_folder)

transformers = pytest.importorskip("transformers")
# HF WavLM mixes a bool key_padding_mask with a float attn_mask inside F.multi_head_attention_forward.
pytestmark = pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, conv_dim=(32,) * 7,
             num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)


def hf_model(kind, norm, stable, cls=None, **extra):
    """A randomly initialised HF model with every parameter perturbed (so no LayerNorm is the identity)."""
    torch.manual_seed(0)
    if kind == "wavlm":
        cfg = transformers.WavLMConfig(**SMALL, num_buckets=16, max_bucket_distance=32, feat_extract_norm=norm,
                                       do_stable_layer_norm=stable, conv_bias=(norm == "layer"), **extra)
        model = (cls or transformers.WavLMModel)(cfg)
    else:
        cfg = transformers.HubertConfig(**SMALL, feat_extract_norm=norm, do_stable_layer_norm=stable,
                                        conv_bias=(norm == "layer"), **extra)
        model = (cls or transformers.HubertModel)(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def batch(lengths, n=None):
    g = torch.Generator().manual_seed(1)
    n = n or max(lengths)
    wave = torch.randn(len(lengths), n, generator=g)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for i, l in enumerate(lengths):
        mask[i, :l] = 1
        wave[i, l:] = 0.0
    return wave, mask


def roundtrip(model, tmp_path):
    model.save_pretrained(tmp_path)
    return load_speech_encoder(str(tmp_path))


@pytest.mark.parametrize("kind", ["wavlm", "hubert"])
def test_layer_norm_stable_matches_hf_with_padding(kind, tmp_path):
    hf = hf_model(kind, "layer", True)
    ours = roundtrip(hf, tmp_path)
    wave, mask = batch([6000, 4321, 2999])
    with torch.no_grad():
        ref = hf(wave, attention_mask=mask).last_hidden_state
        out, valid = ours(wave, mask)
    lengths = conv_output_length(mask.sum(-1), ours.config.conv_kernel, ours.config.conv_stride)
    assert out.shape == ref.shape and valid.shape == out.shape[:2]
    assert valid.sum(-1).tolist() == lengths.tolist()
    torch.testing.assert_close(out[valid], ref[valid], atol=1e-5, rtol=1e-5)


def test_gradients_match_hf_wavlm(tmp_path):
    """Backward parity, the gated position bias's parameters among them. Every layer looks the 2T - 1
    per-distance biases up in layer 0's table and lays them out as a strided Toeplitz view (`distance_bias`,
    `toeplitz`; autograd sums the gradient over the view's overlapping windows); HF looks up every (query, key)
    pair once, in layer 0. 6000 samples give 18 frames: distances past max_exact = 4 reach the logarithmic
    buckets."""
    hf = hf_model("wavlm", "layer", True)
    ours = roundtrip(hf, tmp_path)
    wave, mask = batch([6000, 4321])
    out, valid = ours(wave, mask)
    ref = hf(wave, attention_mask=mask).last_hidden_state
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)) * valid[..., None]
    (out * w).sum().backward()
    (ref * w).sum().backward()
    theirs = convert_hf_state_dict({k: p.grad for k, p in hf.named_parameters() if p.grad is not None})
    compared = {k: p.grad for k, p in ours.named_parameters() if k in theirs}
    assert "layers.0.attention.rel_attn_embed.weight" in compared and len(compared) > 40
    for k, grad in compared.items():
        if k.endswith("k_proj.bias"):   # zero in exact arithmetic (softmax ignores a per-query shift): noise both sides
            continue
        scale = theirs[k].abs().max().item()   # float32 rounding, relative to the gradient's largest entry
        torch.testing.assert_close(grad, theirs[k], atol=1e-5 * scale, rtol=0, msg=k)


def test_load_encoder_checks_the_kind_against_the_folder(tmp_path):
    """A HuBERT folder asked for as WavLM (or the other way round) is an error naming both."""
    from model import load_encoder
    hf_model("hubert", "group", False).save_pretrained(tmp_path / "hubert")
    hf_model("wavlm", "group", False).save_pretrained(tmp_path / "wavlm")
    assert not load_encoder("hubert", str(tmp_path / "hubert")).config.gated_relative_position_bias
    with pytest.raises(ValueError, match="kind 'wavlm' but config.json describes a HuBERT model"):
        load_encoder("wavlm", str(tmp_path / "hubert"))
    with pytest.raises(ValueError, match="kind 'hubert' but config.json describes a WavLM model"):
        load_encoder("hubert", str(tmp_path / "wavlm"))


@pytest.mark.parametrize("kind", ["wavlm", "hubert"])
def test_group_norm_post_ln_matches_hf_without_mask(kind, tmp_path):
    hf = hf_model(kind, "group", False)
    ours = roundtrip(hf, tmp_path)
    assert ours.config.gated_relative_position_bias == (kind == "wavlm")
    wave = torch.randn(2, 12000, generator=torch.Generator().manual_seed(2))  # 37 frames > max_bucket_distance
    with torch.no_grad():
        ref = hf(wave).last_hidden_state
        out, valid = ours(wave)
    assert bool(valid.all())
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_ctc_checkpoint_prefix_and_heads(tmp_path):
    hf = hf_model("wavlm", "layer", True, cls=transformers.WavLMForCTC, vocab_size=12)
    ours = roundtrip(hf, tmp_path)  # wavlm.* keys load; lm_head.* is reported unused
    wave = torch.randn(1, 3000)
    with torch.no_grad():
        ref = hf.wavlm(wave).last_hidden_state
        torch.testing.assert_close(ours(wave)[0], ref, atol=1e-5, rtol=1e-5)
    conv = convert_hf_state_dict(load_file(os.path.join(tmp_path, "model.safetensors")))
    assert "lm_head.weight" in conv and "layers.0.attention.rel_attn_embed.weight" in conv


def test_legacy_weight_norm_names(tmp_path):
    hf = hf_model("wavlm", "layer", True)
    hf.save_pretrained(tmp_path)
    st = os.path.join(tmp_path, "model.safetensors")
    sd = load_file(st)
    for new, old in (("parametrizations.weight.original0", "weight_g"), ("parametrizations.weight.original1", "weight_v")):
        key = f"encoder.pos_conv_embed.conv.{new}"
        sd[key.replace(new, old)] = sd.pop(key)
    save_file({f"wavlm.{k}": v for k, v in sd.items()}, st)  # also exercise the wavlm. prefix
    ours = load_speech_encoder(str(tmp_path))
    wave = torch.randn(2, 4000)
    with torch.no_grad():
        torch.testing.assert_close(ours(wave)[0], hf(wave).last_hidden_state, atol=1e-5, rtol=1e-5)


def test_missing_and_misshaped_keys_are_named(tmp_path):
    hf = hf_model("wavlm", "layer", True)
    hf.save_pretrained(tmp_path)
    st = os.path.join(tmp_path, "model.safetensors")
    sd = load_file(st)
    bad = dict(sd)
    del bad["encoder.layers.1.attention.q_proj.weight"]
    save_file(bad, st)
    named = re.escape(str(tmp_path)) + r": missing tensor\(s\) \[.*layers\.1\.attention\.q_proj\.weight"
    with pytest.raises(KeyError, match=named):
        load_speech_encoder(str(tmp_path))
    bad = dict(sd)
    bad["feature_projection.projection.weight"] = torch.zeros(64, 31)
    save_file(bad, st)
    with pytest.raises(ValueError, match=r"feature_projection\.weight"):
        load_speech_encoder(str(tmp_path))


def test_conv_output_length_matches_convolution():
    cfg = SpeechConfig(**SMALL)
    enc = ConvFeatureEncoder(cfg.conv_dim, cfg.conv_kernel, cfg.conv_stride, False, "layer")
    ns = list(range(400, 2001, 37)) + [16001, 48321, 99999]
    with torch.no_grad():
        for n in ns:
            assert enc(torch.randn(1, n)).shape[-1] == conv_output_length(n, cfg.conv_kernel, cfg.conv_stride), n
    as_tensor = conv_output_length(torch.tensor(ns), cfg.conv_kernel, cfg.conv_stride)
    assert as_tensor.tolist() == [conv_output_length(n, cfg.conv_kernel, cfg.conv_stride) for n in ns]
    assert conv_output_length(16000, WAVLM_LARGE.conv_kernel, WAVLM_LARGE.conv_stride) == 49  # 20 ms frames


def test_conv_feature_encoder_matches_hf_submodules():
    for norm in ("group", "layer"):
        hf = hf_model("wavlm", norm, norm == "layer").feature_extractor
        ours = ConvFeatureEncoder((32,) * 7, (10, 3, 3, 3, 3, 2, 2), (5, 2, 2, 2, 2, 2, 2), norm == "layer", norm)
        ours.load_state_dict(hf.state_dict(), strict=True)  # same key names
        wave = torch.randn(2, 3333)
        with torch.no_grad():
            torch.testing.assert_close(ours(wave), hf(wave), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gated", [True, False])
def test_padding_invariance_layer_variant(gated):
    torch.manual_seed(0)
    cfg = SpeechConfig(**SMALL, num_buckets=16, max_bucket_distance=32, feat_extract_norm="layer",
                       do_stable_layer_norm=True, conv_bias=True, gated_relative_position_bias=gated)
    model = SpeechEncoder(cfg).eval()
    wave, mask = batch([5000, 3001])
    noisy = wave.clone()
    noisy[1, 3001:] = torch.randn(5000 - 3001) * 5
    with torch.no_grad():
        a, valid = model(wave, mask)
        b, _ = model(noisy, mask)
        alone, _ = model(wave[1:, :3001], None)  # the short row on its own, no padding at all
    torch.testing.assert_close(a[valid], b[valid], atol=1e-5, rtol=1e-5)
    n1 = int(valid[1].sum())
    assert n1 == alone.shape[1]
    torch.testing.assert_close(a[1, :n1], alone[0], atol=1e-5, rtol=1e-5)


def test_frame_mask_replaces_masked_frames():
    torch.manual_seed(0)
    cfg = SpeechConfig(**dict(SMALL, num_hidden_layers=0), num_buckets=16, max_bucket_distance=32,
                       feat_extract_norm="layer", do_stable_layer_norm=True)  # no layers: only the pos-conv mixes frames
    model = SpeechEncoder(cfg).eval()
    wave = torch.randn(2, 4000)
    t = conv_output_length(4000, cfg.conv_kernel, cfg.conv_stride)
    frame_mask = torch.zeros(2, t, dtype=torch.bool)
    frame_mask[0, 3:7] = True
    frame_mask[1, 10:12] = True
    with torch.no_grad():
        assert not torch.allclose(model(wave, None, frame_mask)[0], model(wave)[0])
    # Zero the pos-conv so each output frame sees only its own input: masked frames all become the same
    # vector (LayerNorm(masked_spec_embed)) and unmasked frames are unchanged.
    with torch.no_grad():
        model.pos_conv.weight_g.zero_()
        model.pos_conv.bias.fill_(-10.0)  # GELU(-10) ~ 0
        plain, _ = model(wave)
        masked, _ = model(wave, None, frame_mask)
    torch.testing.assert_close(masked[~frame_mask], plain[~frame_mask])
    assert not torch.allclose(masked[frame_mask], plain[frame_mask])
    expect = model.encoder_norm(model.masked_spec_embed)
    torch.testing.assert_close(masked[frame_mask], expect.expand(int(frame_mask.sum()), -1), atol=1e-5, rtol=1e-5)


def test_attention_dropout_acts_in_training_only():
    """Attention-probability dropout alone (hidden, activation and projection dropout 0): in training it
    changes the output, in eval the network is the one without dropout."""
    torch.manual_seed(0)
    cfg = SpeechConfig(**SMALL, num_buckets=16, max_bucket_distance=32, hidden_dropout=0.0, attention_dropout=0.5,
                       activation_dropout=0.0)
    model = SpeechEncoder(cfg)
    wave = torch.randn(2, 4000)
    assert_attention_dropout_only_in_training(model, lambda m: m(wave)[0], "dropout")


def test_masked_frames_features_reach_nothing():
    """The mask embedding replaces masked frames before the positional convolution and the Transformer, so
    what the feature encoder made of those frames reaches no output (applied after the positional
    convolution, it would leak into the neighbours through its 16-frame kernel)."""
    torch.manual_seed(0)
    cfg = SpeechConfig(**SMALL, num_buckets=16, max_bucket_distance=32, feat_extract_norm="layer",
                       do_stable_layer_norm=True)
    model = SpeechEncoder(cfg).eval()
    wave = torch.randn(1, 4000)
    t = conv_output_length(4000, cfg.conv_kernel, cfg.conv_stride)
    frame_mask = torch.zeros(1, t, dtype=torch.bool)
    frame_mask[0, 5:9] = True
    noise = torch.zeros(1, t, cfg.hidden_size)
    noise[frame_mask] = 10 * torch.randn(int(frame_mask.sum()), cfg.hidden_size)
    with torch.no_grad():
        a, _ = model(wave, None, frame_mask)
        hook = model.feature_projection.register_forward_hook(lambda mod, inp, out: out + noise)
        b, _ = model(wave, None, frame_mask)
        hook.remove()
    torch.testing.assert_close(b, a, atol=1e-6, rtol=0)


def test_masked_spec_embed_gets_gradient():
    torch.manual_seed(0)
    cfg = SpeechConfig(**SMALL, num_buckets=16, max_bucket_distance=32)
    model = SpeechEncoder(cfg).train()
    wave = torch.randn(2, 4000)
    t = conv_output_length(4000, cfg.conv_kernel, cfg.conv_stride)
    frame_mask = torch.rand(2, t) < 0.3
    frame_mask[0, 0] = True
    out, _ = model(wave, None, frame_mask)
    out.pow(2).mean().backward()
    assert model.masked_spec_embed.grad is not None and model.masked_spec_embed.grad.abs().sum() > 0
    model.zero_grad()
    model(wave)[0].pow(2).mean().backward()
    assert model.masked_spec_embed.grad is None or model.masked_spec_embed.grad.abs().sum() == 0


def test_config_from_hf_and_presets():
    hub = transformers.HubertConfig().to_dict()
    wav = transformers.WavLMConfig().to_dict()
    assert config_from_hf(hub).gated_relative_position_bias is False
    cw = config_from_hf(wav)
    assert cw.gated_relative_position_bias and cw.num_buckets == 320 and cw.max_bucket_distance == 800
    assert isinstance(cw.conv_dim, tuple) and cw.conv_dim == (512,) * 7
    hub.pop("model_type")
    assert config_from_hf(hub).gated_relative_position_bias is False  # detected by the missing bucket fields
    assert WAVLM_LARGE.hidden_size == 1024 and WAVLM_LARGE.num_hidden_layers == 24
    assert HUBERT_LARGE.gated_relative_position_bias is False and HUBERT_LARGE.conv_bias
    with pytest.raises(ValueError, match="conv_pos_batch_norm"):
        config_from_hf(dict(hub, conv_pos_batch_norm=True))
    # wav2vec 2.0 or UniSpeech-SAT checkpoints have HuBERT's key names: refused by model_type, not loaded
    for other in (transformers.Wav2Vec2Config().to_dict(), transformers.UniSpeechSatConfig().to_dict()):
        with pytest.raises(ValueError, match="neither 'wavlm' nor 'hubert'"):
            config_from_hf(other)
    no_buckets = {k: v for k, v in wav.items() if k != "num_buckets"}
    assert config_from_hf(no_buckets).gated_relative_position_bias  # model_type "wavlm" decides
    json.dumps(hub)  # plain dicts, as read from config.json


def test_layer_norm_feature_encoder_stays_channels_last(monkeypatch):
    """norm="layer" (the large models): every LayerNorm of the feature encoder reads contiguous [B, T, C]
    rows (no transpose copies, docs/speed.md), and the result and its gradients equal the plain
    Conv1d -> LayerNorm -> GELU stack."""
    import torch.nn.functional as F

    from model.wavlm import SPEECH_KERNELS, SPEECH_STRIDES
    torch.manual_seed(0)
    enc = ConvFeatureEncoder((16,) * 7, SPEECH_KERNELS, SPEECH_STRIDES, True, "layer")
    wave = torch.randn(2, 4001, requires_grad=True)   # odd lengths: the stride-2 layers drop a frame
    layouts, layer_norm = [], F.layer_norm
    monkeypatch.setattr(F, "layer_norm", lambda x, *a, **k: layouts.append(x.is_contiguous()) or layer_norm(x, *a, **k))
    y = enc(wave)
    monkeypatch.undo()
    assert layouts == [True] * 7
    x = wave[:, None]
    for block in enc.conv_layers:
        x = F.gelu(block.layer_norm(block.conv(x).transpose(1, 2))).transpose(1, 2)
    assert_same_function(y, x, [wave] + list(enc.parameters()))


@pytest.mark.parametrize("k", [16, 15])
def test_positional_conv_runs_on_the_channels_last_view(monkeypatch, k):
    """The positional convolution is a 2-D one on the channels-last view [B, C, 1, T] of the [B, T, C] frames
    (the input's own memory, no copy: under torch.compile a conv1d got a contiguous [B, C, T] copy, docs/speed.md),
    and it is the plain grouped conv1d with padding k // 2 (the last frame dropped for an even kernel), then
    GELU, values and gradients."""
    import torch.nn.functional as F

    from model.wavlm import PositionalConvEmbedding
    torch.manual_seed(0)
    pc = PositionalConvEmbedding(32, k, 4)
    x = torch.randn(2, 21, 32, requires_grad=True)
    seen, conv2d = [], F.conv2d
    monkeypatch.setattr(F, "conv2d", lambda inp, *a, **kw: seen.append(
        (inp.dim(), inp.is_contiguous(memory_format=torch.channels_last), inp.data_ptr() == x.data_ptr()))
        or conv2d(inp, *a, **kw))
    y = pc(x)
    monkeypatch.undo()
    assert seen == [(4, True, True)]
    ref = F.conv1d(x.transpose(1, 2), pc.conv_weight(), pc.bias, padding=k // 2, groups=4)[:, :, :21]
    assert_same_function(y, F.gelu(ref).transpose(1, 2), [x] + list(pc.parameters()))


# Writing our encoder as a Hugging Face folder (model.save_encoder("wavlm" / "hubert", ...)).

SAVED = {  # the tiny preset's WavLM (LayerNorm feature encoder, pre-LN), and a base-style HuBERT (GroupNorm, post-LN)
    "wavlm": SpeechConfig(**SMALL, conv_bias=True, feat_extract_norm="layer", do_stable_layer_norm=True,
                          num_buckets=32, max_bucket_distance=100, layer_norm_eps=1e-6),
    "hubert": SpeechConfig(**SMALL, feat_extract_norm="group", do_stable_layer_norm=False,
                           gated_relative_position_bias=False, feat_proj_layer_norm=False, mask_time_prob=0.1),
}


def random_speech_encoder(cfg):
    torch.manual_seed(0)
    return perturbed(SpeechEncoder(cfg))


@pytest.mark.parametrize("kind", ["wavlm", "hubert"])
def test_save_hf_folder_loads_back_and_in_transformers(kind, tmp_path):
    """Written with save_encoder, our encoder loads back through load_encoder(kind) with the same config, tensors
    (masked_spec_embed included) and outputs, masked frames too; transformers' WavLMModel / HubertModel reads the
    same folder with no missing or unexpected tensor and computes our last hidden state on a padded batch."""
    from model import load_encoder, save_encoder
    model = random_speech_encoder(SAVED[kind])
    save_encoder(kind, model, str(tmp_path))
    with open(tmp_path / "config.json") as f:
        cfg = json.load(f)
    assert cfg["model_type"] == kind and cfg["conv_dim"] == [32] * 7 and cfg["layerdrop"] == 0.0
    assert "gated_relative_position_bias" not in cfg and ("num_buckets" in cfg) == (kind == "wavlm")
    loaded = load_encoder(kind, str(tmp_path))
    expect = model.config if kind == "wavlm" else dataclasses.replace(  # HuBERT has no bucket fields
        model.config, num_buckets=loaded.config.num_buckets, max_bucket_distance=loaded.config.max_bucket_distance)
    assert loaded.config == expect and not loaded.training
    ours_sd, back = model.state_dict(), loaded.state_dict()
    assert set(back) == set(ours_sd) and all(torch.equal(back[k], ours_sd[k]) for k in ours_sd)
    stored = load_file(os.path.join(tmp_path, "model.safetensors"))
    assert torch.equal(stored["masked_spec_embed"], model.masked_spec_embed.detach())
    assert "encoder.pos_conv_embed.conv.parametrizations.weight.original0" in stored
    wave, mask = batch([6000, 4321, 2999])
    frame_mask = torch.zeros(3, conv_output_length(6000, model.config.conv_kernel, model.config.conv_stride),
                             dtype=torch.bool)
    frame_mask[:, 4:9] = True
    with torch.no_grad():
        for args in ((wave, mask), (wave, mask, frame_mask)):
            assert torch.equal(loaded(*args)[0], model(*args)[0])
        ours, valid = model(wave, mask)
    cls = transformers.WavLMModel if kind == "wavlm" else transformers.HubertModel
    hf, info = cls.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert torch.equal(hf.masked_spec_embed.detach(), model.masked_spec_embed.detach())
    with torch.no_grad():
        ref = hf.eval()(wave, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(ours[valid], ref[valid], atol=1e-4, rtol=1e-4)


def test_save_hf_folder_refuses_what_the_layout_cannot_hold(tmp_path):
    """A WavLM without the feature LayerNorm has no WavLMConfig; a kind that contradicts the model, or another
    module, is named."""
    from model import save_encoder
    with pytest.raises(ValueError, match="feat_proj_layer_norm=False"):
        hf_config(SpeechConfig(**SMALL, feat_proj_layer_norm=False))
    with pytest.raises(ValueError, match=r"kind 'hubert' but the model is a WavLM"):
        save_encoder("hubert", random_speech_encoder(SAVED["wavlm"]), str(tmp_path))
    with pytest.raises(ValueError, match=r"kind 'wavlm' but the model is a HuBERT"):
        save_encoder("wavlm", random_speech_encoder(SAVED["hubert"]), str(tmp_path))
    with pytest.raises(TypeError, match="writes a SpeechEncoder, got a Linear"):
        save_hf_folder(torch.nn.Linear(2, 2), str(tmp_path))
    assert not os.path.exists(tmp_path / "config.json")
