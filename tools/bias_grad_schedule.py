"""How Inductor schedules the gradient of WavLM's shared position bias, read on the CPU.

On a GPU, SDPA with a bias that needs a gradient runs the memory-efficient kernel: one opaque call forward,
one backward that takes the bias and returns its gradient `[B, H, T, T]`. On the CPU it runs the math path,
which Inductor decomposes and fuses differently. So this script stands in for the GPU's op on the CPU: a
custom op with the same interface (forward: q, k, v, bias -> out, logsumexp; backward: ... -> dq, dk, dv,
dbias, the bias padded to a multiple of 8 as ATen's `preprocess_mask` pads it), compiles a small WavLM
(forward + backward, bf16 autocast) and prints, in the order of the compiled backward, the attention
backward calls and the fused kernels that read their bias gradients (the fourth output, `bufN[3]`), with
the buffers they read, and whether each backward call's bias was saved by the forward or is rebuilt in the
backward. The graph capture and the partitioner (what the forward saves) are the GPU's; the scheduler's
fusion rules mostly are (the CPU's code generator fuses some things Triton does not, e.g. a small reduction
into the element-wise kernel after it), so read the groupings as the GPU's likely ones; speed does not carry.

    python -m tools.bias_grad_schedule              # 3 layers of width 64, 0.75 s of audio: ~1 minute

What it shows (docs/speed.md): with layer 0's [H, T, T] bias handed on to the other layers, the gradients of
all layers' biases are reduced in one kernel after the last attention backward (layer 0's); with the
per-distance biases laid out as a Toeplitz view and each layer looking them up itself (model/wavlm.py), each
layer's bias gradient is reduced by a kernel of its own, right after that layer's attention backward.
"""
import argparse
import re

import torch
import torch.nn.functional as F
from torch import Tensor

import model.wavlm as W


@torch.library.custom_op("bias_grad_schedule::attn", mutates_args=())
def attn(q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + bias
    return torch.softmax(s.float(), -1).to(q.dtype) @ v, torch.logsumexp(s.float(), -1)


@attn.register_fake
def _(q, k, v, bias):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("bias_grad_schedule::attn_bwd", mutates_args=())
def attn_bwd(g: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Tensor, out: Tensor,
             lse: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    scale = q.shape[-1] ** -0.5
    p = torch.softmax((q @ k.transpose(-1, -2) * scale + bias).float(), -1)
    dp = (g @ v.transpose(-1, -2)).float()
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    return (ds.to(q.dtype) @ k * scale, ds.to(q.dtype).transpose(-1, -2) @ q * scale,
            p.to(q.dtype).transpose(-1, -2) @ g, ds.to(bias.dtype))


@attn_bwd.register_fake
def _(g, q, k, v, bias, out, lse):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), bias.new_empty(bias.shape)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs, *output)


def _backward(ctx, g, g_lse):
    return attn_bwd(g.contiguous(), *ctx.saved_tensors)


attn.register_autograd(_backward, setup_context=_setup)


def sdpa(q, k, v, attn_mask=None, dropout_p=0.0):
    """F.scaled_dot_product_attention as CUDA's memory-efficient path calls it (dropout left out)."""
    t = attn_mask.shape[-1]
    if t % 8:                                    # ATen's pad_bias: pad the last dim, slice it back
        attn_mask = F.pad(attn_mask, (0, 8 - t % 8))[..., :t]
    return attn(q, k, v, attn_mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2]))[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=0.75)
    args = ap.parse_args()
    W.F = argparse.Namespace(**{k: getattr(F, k) for k in dir(F) if not k.startswith("_")})
    W.F.scaled_dot_product_attention = sdpa      # model/wavlm.py's only attention call
    cfg = W.SpeechConfig(hidden_size=64, num_hidden_layers=args.layers, num_attention_heads=4,
                         intermediate_size=128, conv_dim=(32,) * 7, conv_bias=True, feat_extract_norm="layer",
                         do_stable_layer_norm=True, hidden_dropout=0.0, attention_dropout=0.0,
                         activation_dropout=0.0)
    torch.manual_seed(0)
    model = W.SpeechEncoder(cfg).train()
    wave = torch.randn(2, int(args.seconds * 16000))
    valid = torch.ones_like(wave, dtype=torch.bool)
    compiled = torch.compile(lambda w, a: model(w, a)[0])

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = compiled(wave, valid)
        y.float().square().mean().backward()

    torch._dynamo.reset()
    _, codes = torch._inductor.utils.run_and_get_code(step)
    backward = codes[-1]
    calls, grads = {}, {}   # attention backward call's buffer -> layer; bias gradient's buffer -> layer
    for line in backward.splitlines():
        line = line.strip()
        call = re.match(r"(buf\d+) = torch\.ops\.bias_grad_schedule\.attn_bwd\.default\(", line)
        out = re.match(r"(buf\d+) = (buf\d+)\[3\]$", line)      # its fourth output, dbias
        kernel = re.match(r"(cpp_fused_\w+|triton_\w+)\((.*)\)$", line)
        if call:
            calls[call.group(1)] = args.layers - 1 - len(calls)   # the backward runs the layers last to first
            bias = line.split("(", 1)[1].split(",")[4].strip()     # saved by the forward, or rebuilt here
            print(f"attention backward of layer {calls[call.group(1)]}: its bias {bias} "
                  f"{'rebuilt in the backward' if bias.startswith('buf') else 'saved by the forward'}")
        elif out and out.group(2) in calls:
            grads[out.group(1)] = calls[out.group(2)]
            print(f"  its bias gradient: {out.group(1)}")
        elif kernel:
            read = sorted({grads[a.strip()] for a in kernel.group(2).split(",") if a.strip() in grads})
            if read:
                print(f"  {kernel.group(1)[:100]}...\n    reads the bias gradients of layers {read}")
    if not grads:
        raise SystemExit("no attention backward call found in the compiled backward: the script is out of date")


if __name__ == "__main__":
    main()
