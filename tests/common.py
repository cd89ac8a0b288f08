"""Checks and configs shared by several test files (imported as `from common import ...`: pytest puts tests/ on the path)."""
import dataclasses
import json
import os

import torch
from safetensors.torch import save_file

from icode import preset
from model.quantizers import SPEECH_KERNELS, SPEECH_STRIDES, VQGANConfig, VQGANTokenizer

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
