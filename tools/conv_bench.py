"""The step's four convolutions timed two ways on the card at hand, forward + backward at the benchmark's
paper shapes (batch 24, 7.8 s of audio, 8 frames of 224 x 224), bf16 autocast on a GPU:

- WavLM's feature encoder and positional convolution as the model computes them (cuDNN convolutions on a GPU)
  against the same convolutions as matrix products over windows (`feature_encoder_windows`) and through the
  FFT (`positional_conv_fft`);
- Swin's patch embedding as the model computes it (a matrix product over patches) against the Conv3d whose
  weights it uses (`patch_embed_conv`);
- MVM's deconvolution as the model computes it (ConvTranspose3d, eq. (4)) against the same map as one matrix
  product per fused cell (`deconv_as_matmul`).

One JSON line per convolution (docs/speed.md, "Convolutions"; the H100's lines are in
docs/measured/2026-11-27-h100/conv_bench.jsonl):

    python -m tools.conv_bench                        # on a GPU, well under a minute
    python -m tools.conv_bench --batch 1 --iters 1    # a check on a CPU
"""
import argparse
import contextlib
import json
import time

import torch
import torch.nn.functional as F

from icode import preset
from model.heads import MVMHead
from model.swin3d import PatchEmbed3D
from model.wavlm import ConvFeatureEncoder, PositionalConvEmbedding
from tools.benchmark import BENCH_SHAPES, synthetic_batch


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


def deconv_as_matmul(head, grid):
    """MVMHead.upsample (eq. (4)) with its kernel = stride = 2 deconvolution as what it is, a linear map D -> 8D of
    each fused cell and a reshape into the doubled grid, on the channels-last grid (no transposes around a 3-D
    convolution): out[b, 2t + i, 2h + j, 2w + k, o] = sum_c grid[b, t, h, w, c] W[c, o, i, j, k] + bias[o]."""
    B, T_v, H_v, W_v, D = grid.shape
    w = head.deconv.weight                                    # [D_in, D_out, 2, 2, 2]
    x = F.linear(grid, w.permute(2, 3, 4, 1, 0).flatten(0, 3), head.deconv.bias.repeat(8))  # [B, T_v, H_v, W_v, (i, j, k, o)]
    x = x.view(B, T_v, H_v, W_v, 2, 2, 2, -1).permute(0, 1, 4, 2, 5, 3, 6, 7)  # [B, T_v, i, H_v, j, W_v, k, D]
    return F.gelu(head.layer_norm(x.reshape(B, 2 * T_v, 2 * H_v, 2 * W_v, -1)))


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
        torch.backends.cudnn.benchmark = True   # as training.speed.precision sets it
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    B, cfg = args.batch, preset("paper")
    w = cfg.speech
    enc = ConvFeatureEncoder(w.conv_dim, w.conv_kernel, w.conv_stride, w.conv_bias, w.feat_extract_norm).to(dev)
    pc = PositionalConvEmbedding(w.hidden_size, w.num_conv_pos_embeddings, w.num_conv_pos_embedding_groups).to(dev)
    embed = PatchEmbed3D(cfg.vision).to(dev)
    head = MVMHead(cfg.fusion.dim, cfg.video_codebook).to(dev)
    # The benchmark's inputs (BENCH_SHAPES: 7.8 s of audio, 8 frames of 224 x 224) and the shapes they reach
    # the positional convolution (speech frames) and the MVM head (the fused grid, half the token grid) at.
    batch = synthetic_batch(cfg, B, device=dev, **BENCH_SHAPES["paper"])
    T_s, (T, h, w_) = batch["audio_mask"].shape[1], batch["video_mask"].shape[1:]
    cases = [  # name, the model's way, the alternative (its name, function), input
        ("speech feature encoder (7 convolutions)", enc, "windows", lambda x: feature_encoder_windows(enc, x),
         batch["audio"].requires_grad_()),
        ("speech positional convolution (128 taps, 16 groups)", pc, "FFT", lambda x: positional_conv_fft(pc, x),
         torch.randn(B, T_s, w.hidden_size, device=dev, requires_grad=True)),
        ("video patch embedding (2 x 4 x 4)", embed, "Conv3d", lambda x: patch_embed_conv(embed, x),
         batch["video"]),                                                               # pixels need no gradient
        ("MVM deconvolution (2 x 2 x 2)", head.upsample, "matrix product", lambda x: deconv_as_matmul(head, x),
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
