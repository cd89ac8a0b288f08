"""Bytes the compiled pretraining step moves, as Inductor counts them while generating its kernels: a proxy
for the step's memory traffic, measured on the CPU.

For each batch size this compiles the objective afresh (caches off), runs one `train.train_step` under bf16
autocast and prints the bytes every generated kernel reads and writes (Inductor's own count: `count_bytes`,
the minimum each kernel needs), summed by the model file and the source line the kernel comes from, fused
(Inductor-generated) and extern (matrix products, convolutions) apart. With two batch sizes it also prints
the per-example part, the difference, which scales to the benchmark's batch 24.

    python -m tools.inductor_bytes --preset paper --batch 1 2 --top 25   # 16-27 minutes on 2 CPU cores

What is the GPU's and what is not: Inductor's CPU and GPU back ends share the graph capture, the
decompositions and the scheduler's fusion decisions (their code generators differ), so the element-wise and
normalisation traffic around the matrix products is close to what the GPU build moves. Attention is not: on
the CPU, SDPA with a bias that needs a gradient (WavLM, Swin, DeBERTa) or with dropout runs the unfused math
path, which materialises scores and probabilities. Kernels from `scaled_dot_product_attention` lines are
therefore counted apart, and beside them the traffic a fused GPU kernel needs at the same shapes (inputs and
outputs of the forward and backward, bf16; the calls' shapes recorded in an eager forward of the same batch).
docs/speed.md has the numbers and how far to trust them. Written against torch 2.13's Inductor
(`GraphLowering.count_bytes`, the `inductor_metrics` log that switches it on).
"""
import argparse
import collections
import glob
import logging
import os
import re
import sys
import time

import torch
import torch._inductor.config as inductor_config
import torch._inductor.graph as inductor_graph
import torch.nn.functional as F

from icode import ICode
from icode import preset as model_preset
from losses import PAPER_WEIGHTS as WEIGHTS
from losses import count_targets
from tools.benchmark import BENCH_SHAPES, synthetic_batch
from train import PretrainObjective, train_step
from training.distributed import Dist
from training.speed import compile_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
kernels = []      # ((file, line) or None, "fused" / "extern", bytes) of every kernel generated
sdpa_calls = []   # bytes a fused GPU attention kernel would move for each SDPA call (forward + backward)
SOURCES = {}      # the repository's Python files as this run imported them (read_sources)


def source_line(node):
    """The last line of this repository on the stack of the FX nodes a scheduler node came from."""
    last = None
    for sub in node.get_nodes():
        for fx in getattr(sub.node, "origins", None) or ():
            frames = re.findall(r'File "([^"]+)", line (\d+)', fx.meta.get("stack_trace") or "")
            ours = [(f, n) for f, n in frames if f.startswith(ROOT + os.sep)]
            if ours:
                last = (os.path.relpath(ours[-1][0], ROOT), int(ours[-1][1]))
    return last


def counting(count_bytes):
    def wrapped(self):
        total, per_node, runtimes = count_bytes(self)
        for node, words in per_node:  # count_bytes reports bytes // 4 per node
            kind = "extern" if "Extern" in type(node).__name__ else "fused"
            kernels.append((source_line(node), kind, words * 4))
        return total, per_node, runtimes
    return wrapped


class RecordSDPA(torch.overrides.TorchFunctionMode):
    """Bytes of a fused attention kernel per SDPA call: forward reads q, k, v, bias and writes the output
    (and its log-sum-exp); backward reads those and the output's gradient, writes dq, dk, dv (and the bias's
    gradient, at the broadcast shape, when the bias needs one). 2 bytes per element (bf16)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            qkv = q.numel() + k.numel() + v.numel()
            out = q.shape[:-1].numel() * v.shape[-1]
            lse = q.shape[:-1].numel() * 2  # float32
            bias = 0 if mask is None else mask.numel()
            dbias = 0
            if mask is not None and mask.requires_grad:
                dbias = torch.broadcast_shapes(mask.shape, q.shape[:-1] + k.shape[-2:-1]).numel()
            sdpa_calls.append(2 * ((qkv + bias + out + lse) + (qkv + bias + 2 * out + lse + qkv + dbias)))
        return func(*args, **kwargs)


def measure(preset, batch):
    """One compiled train_step at `batch`; returns {(file, line, kind): bytes} and the SDPA estimate."""
    torch._dynamo.reset()
    kernels.clear()
    sdpa_calls.clear()
    torch.manual_seed(0)
    model = ICode(model_preset(preset))
    objective = PretrainObjective(model, WEIGHTS)
    b = synthetic_batch(model.cfg, batch, device="cpu", **BENCH_SHAPES[preset])
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    train_step(objective, compile_step(objective), [b], Dist(), autocast)
    targets = model.targets(b)                    # the same step's attention calls, eagerly, for their shapes
    with RecordSDPA(), autocast():
        objective(b, targets, count_targets(targets, model.cfg.msm_combined), 1)
    by = collections.Counter()
    for src, kind, n in kernels:
        by[(src or ("?", 0)) + (kind,)] += n
    return by, sum(sdpa_calls), len(kernels)


def read_sources():
    """The repository's Python files as the run imported them ({relative path: lines}): kernels are filed by
    source line, and a file edited while the run goes on must not shift what those lines say."""
    paths = glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "model", "*.py"))
    return {os.path.relpath(p, ROOT): open(p).read().splitlines() for p in paths}


def code_line(path, line):
    lines = SOURCES.get(path, [])
    return lines[line - 1] if 0 < line <= len(lines) else ""


def is_sdpa(path, line):
    return "scaled_dot_product_attention" in code_line(path, line)


def summary(by, sdpa, label, top):
    total = sum(by.values())
    rest = collections.Counter({k: n for k, n in by.items() if not is_sdpa(k[0], k[1])})  # attention apart
    attn = total - sum(rest.values())
    print(f"\n== {label}: {total / 1e9:.2f} GB in all; attention kernels (CPU math path) {attn / 1e9:.2f} GB; "
          f"the rest {(total - attn) / 1e9:.2f} GB; fused GPU attention at these shapes {sdpa / 1e9:.2f} GB")
    parts = collections.Counter()
    for (f, ln, kind), n in rest.items():
        parts[(f, kind)] += n
    for (f, kind), n in parts.most_common():
        print(f"   {f:22s} {kind:6s} {n / 1e9:8.2f} GB")
    print("   top source lines (attention apart):")
    for (f, ln, kind), n in rest.most_common(top):
        code = code_line(f, ln).strip()[:70]
        print(f"   {f}:{ln:<5d} {kind:6s} {n / 1e9:8.2f} GB   {code}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="paper", choices=["paper", "tiny"])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 2], help="one or two batch sizes")
    p.add_argument("--top", type=int, default=15, help="source lines listed")
    args = p.parse_args(argv)
    SOURCES.update(read_sources())
    if not 1 <= len(args.batch) <= 2:
        raise ValueError(f"--batch takes one or two sizes, got {args.batch}")
    inductor_config.fx_graph_cache = False      # every kernel generated (and counted) in this process
    torch._functorch.config.enable_autograd_cache = False
    torch._logging.set_logs(inductor_metrics=True)  # makes Inductor count bytes; its own log line is dropped
    logging.getLogger("torch._inductor.compile_fx.__inductor_metrics").addFilter(lambda record: False)
    inductor_graph.GraphLowering.count_bytes = counting(inductor_graph.GraphLowering.count_bytes)
    results = []
    for b in args.batch:
        t = time.perf_counter()
        by, sdpa, n = measure(args.preset, b)
        print(f"batch {b}: {n} kernels counted, {time.perf_counter() - t:.0f} s", file=sys.stderr)
        results.append((b, by, sdpa))
        summary(by, sdpa, f"{args.preset} preset, batch {b}", args.top)
    if len(results) == 2:
        (b1, by1, s1), (b2, by2, s2) = results
        per = collections.Counter({k: (by2[k] - by1[k]) / (b2 - b1) for k in set(by1) | set(by2)})
        fixed = sum(by1.values()) - b1 * sum(per.values())
        print(f"\n== independent of the batch (weights, gradients, casts): {fixed / 1e9:.2f} GB; the rest grows "
              f"with it (batch {b2} minus batch {b1}, per example), shown x 24 (the benchmark's batch):")
        summary(collections.Counter({k: 24 * n for k, n in per.items()}), 24 * (s2 - s1) / (b2 - b1),
                "per example x 24", args.top)


if __name__ == "__main__":
    main()
