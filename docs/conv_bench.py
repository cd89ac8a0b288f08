"""The step's four convolutions timed two ways on the card at hand, forward + backward at the benchmark's
paper shapes (batch 24, 7.8 s of audio, 8 frames of 224 x 224), bf16 autocast on a GPU:

- WavLM's feature encoder and positional convolution as the model computes them (cuDNN convolutions on a GPU)
  against the same convolutions as matrix products over windows (`feature_encoder_windows`) and through the
  FFT (`positional_conv_fft`), two ways the model does not use (docs/speed.md says why);
- Swin's patch embedding and MVM's deconvolution (kernel = stride) as the model computes them, matrix
  products over patches / cells, against the Conv3d and ConvTranspose3d modules whose weights they use.

One JSON line per convolution, so the choices of docs/speed.md ("Convolutions: which as matrix products") are
settled by a measurement:

    python docs/conv_bench.py                        # on a GPU, well under a minute
    python docs/conv_bench.py --batch 1 --iters 1    # a check on a CPU
"""
import argparse
import contextlib
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
from icode import preset  # noqa: E402
from model.heads import MVMHead  # noqa: E402
from model.swin3d import PatchEmbed3D  # noqa: E402
from model.wavlm import ConvFeatureEncoder, PositionalConvEmbedding  # noqa: E402


def feature_encoder_windows(enc, wave):
    """ConvFeatureEncoder.forward (norm="layer") with each strided convolution as what it is, one linear map
    applied to overlapping windows of the time-major signal: windows [B, T_out, k * C_in] (`unfold`: a view
    for the two layers with kernel = stride, a copy for the others) times the kernel flattened to
    [C_out, k * C_in]. Matrix products at the matmul rate, against the window copies and, backward, the sum
    of the overlapping windows' gradients. Returns [B, C, T_s] like the model."""
    x = wave[:, :, None]                                      # [B, N, 1]: time-major, one channel
    for block in enc.conv_layers:
        conv, k, s = block.conv, block.conv.kernel_size[0], block.conv.stride[0]
        windows = x.unfold(1, k, s).transpose(2, 3).flatten(2)                     # [B, T_out, k * C_in]
        x = F.gelu(block.layer_norm(F.linear(windows, conv.weight.transpose(1, 2).flatten(1), conv.bias)))
    return x.transpose(1, 2)


def positional_conv_fft(pc, x):
    """PositionalConvEmbedding.forward through the FFT (convolution theorem), in float32: x [B, T, C] ->
    [B, T, C]. One [C/groups x C/groups] complex product per frequency and group (~3 GFLOP at batch 24)
    instead of 128 taps of the grouped convolution (0.16 TFLOP forward), plus the transforms; the kernel's
    spectrum, [T + k, groups, C/groups, C/groups] complex, does not depend on the batch."""
    B, T, C = x.shape
    k, g = pc.k, pc.groups
    n = T + k                 # FFT length >= T + k - 1: the circular convolution never wraps around
    with torch.autocast(x.device.type, enabled=False):
        # Conv1d is a cross-correlation, y[t] = sum_j w[j] x[t + j - k//2]: a convolution with the flipped
        # kernel, whose full output index is t + (k - 1) - k//2.
        xf = torch.fft.rfft(x.float(), n=n, dim=1).view(B, -1, g, C // g)                           # [B, F, g, in]
        wf = torch.fft.rfft(pc.conv_weight().float().flip(-1), n=n, dim=-1).view(g, C // g, C // g, -1)  # [g, out, in, F]
        yf = torch.einsum("bfgi,goif->bfgo", xf, wf).reshape(B, -1, C)                              # [B, F, C]
        y = torch.fft.irfft(yf, n=n, dim=1)[:, k - 1 - k // 2:][:, :T] + pc.bias
    return F.gelu(y).to(x.dtype)


def patch_embed_conv(embed, video):
    """Conv3d with kernel = stride, channels to the end, LayerNorm."""
    return embed.norm(embed.proj(video).permute(0, 2, 3, 4, 1))


def deconv(head, grid):
    """ConvTranspose3d on the channels-first grid, back to channels-last, LayerNorm, GELU."""
    x = head.deconv(grid.permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1)
    return F.gelu(head.layer_norm(x))


def time_ms(fn, x, iters, sync, autocast):
    """Median milliseconds of forward + backward (the gradient of the output's sum)."""
    times = []
    for i in range(iters + 2):                  # two warm-up runs (cuDNN's algorithm search among them)
        sync()
        t = time.perf_counter()
        with autocast():
            y = fn(x)
        y.float().sum().backward()
        sync()
        if i >= 2:
            times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=24)
    p.add_argument("--iters", type=int, default=10, help="timed runs (median reported)")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    if cuda:
        torch.backends.cudnn.benchmark = True   # as train.py sets it
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    B, cfg = args.batch, preset("paper")
    w = cfg.speech
    enc = ConvFeatureEncoder(w.conv_dim, w.conv_kernel, w.conv_stride, w.conv_bias, w.feat_extract_norm).to(dev)
    pc = PositionalConvEmbedding(w.hidden_size, w.num_conv_pos_embeddings, w.num_conv_pos_embedding_groups).to(dev)
    embed = PatchEmbed3D(cfg.vision).to(dev)
    head = MVMHead(cfg.fusion.dim, cfg.video_codebook).to(dev)
    # The benchmark's inputs (train.BENCH_SHAPES: 7.8 s of audio, 8 frames of 224 x 224) and the shapes they
    # reach the positional convolution (speech frames) and the MVM head (the fused grid, half the token grid) at.
    batch = train.synthetic_batch(cfg, B, device=dev, **train.BENCH_SHAPES["paper"])
    T_s, (T, h, w_) = batch["audio_mask"].shape[1], batch["video_mask"].shape[1:]
    cases = [  # name, the model's way, the alternative (its name, function), input
        ("speech feature encoder (7 convolutions)", enc, "windows", lambda x: feature_encoder_windows(enc, x),
         batch["audio"].requires_grad_()),
        ("speech positional convolution (128 taps, 16 groups)", pc, "FFT", lambda x: positional_conv_fft(pc, x),
         torch.randn(B, T_s, w.hidden_size, device=dev, requires_grad=True)),
        ("video patch embedding (2 x 4 x 4)", embed, "Conv3d", lambda x: patch_embed_conv(embed, x),
         batch["video"]),                                                               # pixels need no gradient
        ("MVM deconvolution (2 x 2 x 2)", head.upsample, "ConvTranspose3d", lambda x: deconv(head, x),
         torch.randn(B, -(-T // 2), -(-h // 2), -(-w_ // 2), cfg.fusion.dim, device=dev, requires_grad=True)),
    ]
    name = torch.cuda.get_device_name() if cuda else "cpu"
    for label, model_fn, alt_name, alt_fn, x in cases:
        with torch.no_grad(), autocast():
            a, b = model_fn(x).float(), alt_fn(x).float()
        line = {"conv": label, "batch": B, "device": name,
                "model_ms": round(time_ms(model_fn, x, args.iters, sync, autocast), 2),
                "alternative": alt_name, "alternative_ms": round(time_ms(alt_fn, x, args.iters, sync, autocast), 2),
                "max_abs_diff": float(f"{(a - b).abs().max().item():.3g}")}
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
