"""Checks and configs shared by several test files (imported as `from common import ...`: pytest puts tests/ on the path)."""
import dataclasses
import json
import os

import numpy as np
import torch
from safetensors.torch import save_file

import pipeline.media
from icode import ICode, preset
from model.quantizers import SPEECH_KERNELS, SPEECH_STRIDES, VQGANConfig, VQGANTokenizer
from tools.benchmark import synthetic_batch

# A small VQGAN (16-pixel patches, 128 codes) for tests of the tokenizer and of the model around it.
SMALL_VQ = VQGANConfig(ch=32, ch_mult=(1, 1, 2, 2, 2), num_res_blocks=1, attn_resolutions=(16,), resolution=64,
                       z_channels=16, n_embed=128, embed_dim=8)


def assert_attention_dropout_only_in_training(model, run, rate_attr, where=slice(None)):
    """`model` has attention-probability dropout and no other: run(model) -> output. In training the dropout
    changes output[where]; in eval the output is that of the network with the rate (`rate_attr` on every
    submodule that has it) set to 0, in training mode too."""
    with torch.no_grad():
        ref = run(model.eval())
        train = run(model.train())
        assert not torch.allclose(train[where], ref[where], atol=1e-3)
        modules = [m for m in model.modules() if isinstance(getattr(m, rate_attr, None), float)]
        assert modules and all(getattr(m, rate_attr) > 0 for m in modules)
        for m in modules:
            setattr(m, rate_attr, 0.0)
        torch.testing.assert_close(run(model.train()), ref)


def assert_same_function(y, ref, inputs, grad_atol=1e-4):
    """y and ref, two ways of computing one function of `inputs` (input tensors and parameters): the same values
    (to 1e-5) and, for one random upstream gradient, the same gradients (rtol 1e-4, atol `grad_atol` times
    the largest entry of the gradient)."""
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(y, inputs, g), torch.autograd.grad(ref, inputs, g)):
        torch.testing.assert_close(a, b, atol=grad_atol * b.abs().max().item(), rtol=1e-4)


def with_dropout(name, *a, dropout=0.1, **k):
    """icode.preset with every dropout and stochastic depth the paper preset has (attention, hidden and
    activation dropout in the encoders and the fusion network, Swin's drop path) at `dropout`; the tiny
    preset has none, so tests of what restoring an RNG state buys turn them on."""
    cfg = preset(name, *a, **k)
    r = dataclasses.replace
    cfg.text = r(cfg.text, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    cfg.speech = r(cfg.speech, hidden_dropout=dropout, attention_dropout=dropout, activation_dropout=dropout)
    cfg.vision = r(cfg.vision, drop_path_rate=dropout)
    cfg.fusion = r(cfg.fusion, dropout=dropout)
    return cfg


def save_vq(path, tok, sd=None, nested=True):
    """A VQGAN tokenizer folder: config.json (taming-transformers' nested layout, or flat) + model.safetensors."""
    os.makedirs(path, exist_ok=True)
    c = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(tok.config).items()}
    cfg = {"embed_dim": c.pop("embed_dim"), "n_embed": c.pop("n_embed"), "ddconfig": c} if nested else c
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    sd = dict(tok.state_dict()) if sd is None else sd
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(path, "model.safetensors"))
    return str(path)


def save_vqgan_folder(path, config=SMALL_VQ, seed=0):
    """A randomly initialised VQGAN tokenizer written as a pretrained folder; returns its path."""
    torch.manual_seed(seed)
    return save_vq(path, VQGANTokenizer(config))


def hf_wav2vec2_config(norm="group", bias=False):
    """A tiny transformers Wav2Vec2Config: the real frame arithmetic (400-sample window, 320 stride), 2 x 40 codes."""
    from transformers import Wav2Vec2Config
    return Wav2Vec2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                          conv_dim=(16, 16, 16, 16, 16, 16, 24), conv_kernel=SPEECH_KERNELS,
                          conv_stride=SPEECH_STRIDES, conv_bias=bias, feat_extract_norm=norm,
                          do_stable_layer_norm=(norm == "layer"), num_conv_pos_embeddings=16,
                          num_conv_pos_embedding_groups=2, num_codevector_groups=2, num_codevectors_per_group=40,
                          codevector_dim=16, proj_codevector_dim=16, vocab_size=12)


def save_wav2vec2_folder(path, seed=0, **kw):
    """A randomly initialised transformers Wav2Vec2ForPreTraining saved as a Hugging Face folder."""
    from transformers import Wav2Vec2ForPreTraining
    torch.manual_seed(seed)
    Wav2Vec2ForPreTraining(hf_wav2vec2_config(**kw)).save_pretrained(path)
    return str(path)


# The tiny model and a synthetic batch of the gradient-cache, DDP and compile tests (test_train, test_static_rows).

def perturbed(model, seed=0):
    """`model` in eval mode with every tensor moved by 0.1 N(0, 1) (no LayerNorm left the identity, no bias table
    at zero), so that a tensor written under the wrong name or layout changes the outputs."""
    torch.manual_seed(seed)
    model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def make_model(mode="merge", train_mode=False, dropout=0.0):
    """The tiny preset, no dropout unless `dropout` > 0 (`with_dropout`)."""
    torch.manual_seed(0)
    cfg = with_dropout("tiny", mode, dropout=dropout) if dropout else preset("tiny", mode)
    return ICode(cfg).train(train_mode)


def make_batch(model, B=4):
    b = synthetic_batch(model.cfg, B, text_len=10, seconds=0.4, frames=4, res=64, device="cpu", seed=1)
    b["text_attention"][1, 7:] = False
    b["text_labels"][1, 7:] = -100
    b["audio_attention"][2, 4000:] = False
    return b


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_close(g1, g2, tol=2e-5):
    """Every gradient within tol of its tensor's largest entry. float32 summation order alone moves the
    DDP and gradient-cache comparisons by up to 1.05e-5 across torch versions (2.4.1, 2.11.0); a wrong
    scale or a missing term moves them by 1e-1 or more."""
    assert set(g1) == set(g2), sorted(set(g1) ^ set(g2))[:5]
    worst = max((g1[k] - g2[k]).abs().max().item() / (g2[k].abs().max().item() + 1e-3) for k in g1)
    assert worst < tol, worst


# Real media for the data tests (test_media, test_data, test_loader).

def write_manifest(path, rows):
    """A JSON Lines manifest of `rows` (dicts, or strings written as they are); returns its path."""
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def grey_clip(path, n=40, fps=10, keyint=5, audio=None, sr=16000, preset="ultrafast", fmt="mp4"):
    """Frame f is a uniform grey of level 5 * f + 20, so a decoded frame tells its index."""
    frames = np.stack([np.full((48, 64, 3), 5 * f + 20, np.uint8) for f in range(n)])
    pipeline.media.write_mp4(str(path), frames, fps, audio, sr, keyint=keyint, preset=preset, fmt=fmt)
    return str(path)


def frame_index(img):
    return int(round((img.astype(float).mean() - 20) / 5))
