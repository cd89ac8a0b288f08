"""WavLM's gated position bias through 24 layers of attention, compiled, forward + backward, three ways (a GPU
measurement of about 1-2 minutes, most of it compiling; docs/speed.md):

- `shared_lookup`: layer 0 looks up the [H, T, T] position bias P, one bucket per (i, j) pair, and every layer
  builds its bias as `addcmul(pad, gate, P)`, the [B, H, T, 1] gate times P (Hugging Face's way). Under
  torch.compile the gradient of P is one kernel over all layers' bias gradients after the last attention
  backward.
- `per_layer_bmm`: the same bias through `GatedBias`, whose backward reduces P's gradient in each layer as one
  batched matrix product `[H*T, 1, B] @ [H*T, B, T]` that Inductor hands to cuBLAS. On the H100 it took 34.5 ms
  against shared_lookup's 33.7 (docs/measured/2026-11-27-h100-3/bias_grad_bench.jsonl): not used.
- `per_layer_toeplitz`: the model's way (model/wavlm.py `distance_bias`, `toeplitz`): every layer looks up the
  2T - 1 per-distance biases and lays them out as a strided Toeplitz view, so each layer's bias gradient has
  its own way back to the table.

    python -m tools.bias_grad_bench            # GPU: paper shapes (24 layers, batch 24, 16 heads, 389 frames)
    python -m tools.bias_grad_bench --small    # CPU check: 2 layers, batch 2, float32

Prints one JSON line per variant: compile and forward + backward times, and the gradients' largest
difference from shared_lookup's (the same function: bf16 rounding apart).
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F

from model.wavlm import WAVLM_LARGE, distance_bias, relative_position_bucket, toeplitz


class GatedBias(torch.autograd.Function):
    """pad + gate * P, gate [B, H, T, 1], P [H, T, T], pad [B, 1, 1, T] -> [B, H, T, T]; the gradient of P
    as one batched product per call: dP[h, i, :] = sum_b gate[b, h, i] dBias[b, h, i, :]."""

    @staticmethod
    def forward(ctx, pad, gate, pos):
        ctx.save_for_backward(gate, pos)
        return torch.addcmul(pad, gate, pos)

    @staticmethod
    def backward(ctx, grad):
        gate, pos = ctx.saved_tensors
        B, H, T, _ = grad.shape
        d_gate = (grad * pos).sum(-1, keepdim=True)                           # [B, H, T, 1]
        g = gate.squeeze(-1).permute(1, 2, 0).reshape(H * T, 1, B)            # [H*T, 1, B]
        d_pos = torch.bmm(g, grad.permute(1, 2, 0, 3).reshape(H * T, B, T))   # a strided view: no copy
        return None, d_gate, d_pos.view(H, T, T)


def run(args):
    cuda = torch.cuda.is_available() and not args.small
    dev = torch.device("cuda" if cuda else "cpu")
    dt = torch.bfloat16 if cuda else torch.float32
    L, B, H, T, d = (24, 24, 16, 389, 64) if not args.small else (2, 2, 4, 37, 16)
    torch.manual_seed(0)
    nb, md = WAVLM_LARGE.num_buckets, WAVLM_LARGE.max_bucket_distance          # 320 buckets, saturating at 800
    table = torch.nn.Embedding(nb, H).to(dev)
    pos_idx = torch.arange(T, device=dev)
    buckets = relative_position_bucket(pos_idx[None, :] - pos_idx[:, None], nb, md)
    qkv = [[torch.randn(B, H, T, d, device=dev, dtype=dt, requires_grad=True) for _ in range(3)] for _ in range(L)]
    gates = [(torch.rand(B, H, T, 1, device=dev) + 0.5).requires_grad_(True) for _ in range(L)]
    ups = [torch.randn(B, H, T, d, device=dev, dtype=dt) for _ in range(L)]
    pad = torch.zeros(B, 1, 1, T, device=dev, dtype=dt)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def loss(variant):
        per_layer = variant == "per_layer_toeplitz"
        shared = None if per_layer else table(buckets).permute(2, 0, 1).to(dt)   # [H, T, T], looked up once
        total = 0.0
        for (q, k, v), gate, up in zip(qkv, gates, ups):
            if per_layer:
                bias = torch.addcmul(pad, gate.to(dt), toeplitz(distance_bias(table, T, nb, md), T).to(dt))
            else:
                bias = (GatedBias.apply if variant == "per_layer_bmm" else torch.addcmul)(pad, gate.to(dt), shared)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            total = total + (y.float() * up.float()).sum()
        return total

    grads = {}
    for name in ("shared_lookup", "per_layer_bmm", "per_layer_toeplitz"):
        f = torch.compile(lambda: loss(name))
        params = [table.weight] + gates

        def step():
            for p in params:
                p.grad = None
            f().backward()

        t0 = time.perf_counter()
        step()
        sync()
        compile_s = time.perf_counter() - t0
        for _ in range(2):
            step()
        sync()
        t0 = time.perf_counter()
        for _ in range(args.iters):
            step()
        sync()
        ms = (time.perf_counter() - t0) / args.iters * 1e3
        grads[name] = [p.grad.float().clone() for p in params]
        diff = max((a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)
                   for a, b in zip(grads[name], grads["shared_lookup"]))
        print(json.dumps({"part": "wavlm_gated_bias_fwd_bwd", "variant": name, "device": str(dev) if not cuda
                          else torch.cuda.get_device_name(), "layers": L, "batch": B, "frames": T,
                          "compile_s": round(compile_s, 1), "fwd_bwd_ms": round(ms, 3),
                          "grad_max_rel_diff_vs_shared_lookup": round(diff, 6)}), flush=True)
        torch._dynamo.reset()
    return grads


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="a CPU check at toy sizes, float32")
    ap.add_argument("--iters", type=int, default=10)
    run(ap.parse_args())
