"""The bare-step benchmark: this project's real training step on synthetic tensors of the paper's shapes, one JSON
line with the fields of the off-the-shelf reference (../shared/bench/reference_step.py); docs/speed.md.

    python -m tools.benchmark --preset paper --batch 24                       # eager
    python -m tools.benchmark --preset paper --batch 24 --compile --compile-mode reduce-overhead --profile 2
    python -m tools.benchmark --preset tiny --batch 2 --bench-steps 2 --device cpu   # on a CPU
"""
import json
import time

import torch
from torch._dynamo.utils import counters  # Inductor's counts (cudagraph_skips) for the benchmark line

import data as D
from icode import ICode, preset
from tools.profile import profile_steps
from train import PretrainObjective, batch_size, build_optimizer, grad_norm, parse_args, split_batch, train_step
from training.distributed import setup_distributed
from training.speed import clip_and_step, compile_step, count_flops, enable_checkpointing, precision
from training.static_rows import static_rows_config


def synthetic_batch(cfg, B, text_len, seconds, frames, res, device, seed=0, data=D.PAPER_DATA):
    """A collated batch of the given shapes with the real masks (30% MLM, tube, span: `data`'s settings) and
    offline-cache style targets, as the off-the-shelf reference step uses (../shared/bench/reference_step.py)."""
    g = torch.Generator().manual_seed(seed)
    V = cfg.text.vocab_size
    ids = torch.randint(5, V, (B, text_len), generator=g)
    special = torch.zeros(B, text_len, dtype=torch.bool)
    inputs, labels = D.mask_tokens(ids, special, 4, V, data.text_mask_ratio, generator=g)
    N = int(seconds * 16000)
    from model.wavlm import conv_output_length
    T_s = conv_output_length(N, cfg.speech.conv_kernel, cfg.speech.conv_stride)
    h = res // 16
    batch = {"modalities": ("video", "text", "audio"), "source": "synthetic",
             "video": torch.randn(B, 3, frames, res, res, generator=g),
             "video_mask": torch.stack([D.tube_mask(frames, h, h, data.tube_ratio, g) for _ in range(B)]),
             "video_targets": torch.randint(0, cfg.video_codebook, (B, frames, h, h), generator=g),
             "text_ids": inputs, "text_ids_clean": ids, "text_labels": labels,
             "text_attention": torch.ones(B, text_len, dtype=torch.bool),
             "audio": torch.randn(B, N, generator=g), "audio_attention": torch.ones(B, N, dtype=torch.bool),
             "audio_mask": D.span_mask_batch([T_s] * B, None, data.span_p, data.span_len, g),
             "audio_targets": torch.randint(0, cfg.speech_vars, (B, T_s, cfg.speech_groups), generator=g)}
    return D.to_device(batch, device)


def matmul_peak(device):
    """Measured bf16 matrix-multiply rate (8192^3, as the reference measures it)."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192 ** 3 * 10 / (time.perf_counter() - t)


# The benchmark's input shapes per preset: the paper's (the reference step's) and a toy size for the CPU.
BENCH_SHAPES = {"paper": dict(text_len=128, seconds=7.8, frames=8, res=224),
                "tiny": dict(text_len=32, seconds=2.0, frames=4, res=64)}


def benchmark(args, d):
    """Time the real training step (train_step over --accum micro-batches of --batch, clipping, AdamW with the
    run's settings) and print one JSON line with the reference's fields."""
    paper = args.preset == "paper"
    torch.manual_seed(0)
    cuda = d.device.type == "cuda"
    model = ICode(preset(args.preset, args.fusion)).to(d.device)
    if args.checkpointing:
        enable_checkpointing(model)
    autocast = precision(args.bf16, d.device)
    weights = dict(alpha=args.alpha, beta=args.beta, gamma=args.gamma, lam=args.lam)
    dcfg = D.PAPER_DATA if paper else D.TOY_DATA                # the masking settings of the synthetic batch
    objective = PretrainObjective(model, weights, args.unmasked_contrastive, static_rows_config(args, dcfg))
    runner = compile_step(objective, args.compile_mode, eager_random=args.accum > 1) if args.compile else objective
    opt = build_optimizer(model, args.lr_fusion, args.lr_encoders, args.weight_decay, lr_scales=args.lr_temperature)
    n = args.batch * args.accum                     # samples a step
    batch = synthetic_batch(model.cfg, n, device=d.device, data=dcfg, **BENCH_SHAPES[args.preset])
    objective.check_batch(batch)
    mbs = split_batch(batch, args.accum)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step():
        terms = train_step(objective, runner, mbs, d, autocast)
        clip_and_step(opt, model.parameters(), grad_norm(model.parameters()), args.clip)
        model.logit_scales.clamp_()
        opt.zero_grad(set_to_none=True)
        return terms

    # one forward + backward over a micro-batch, times --accum: the gradient cache's extra forward of the
    # contrastive representations is not counted (the MFU of train.main counts the same way). Counted eagerly
    # before the compiled step: CUDA graphs keep their own memory pool (38.5 GiB at the paper preset on the
    # H100), and the eager pass on top of it ran out of memory; empty_cache hands the eager pass's blocks back.
    flops, flops_fwd = count_flops(objective, mbs[0], autocast, by_part=True)
    flops, flops_fwd = flops * args.accum, {k: v * args.accum for k, v in flops_fwd.items()}
    parts = encoder_breakdown(model, mbs[0], autocast, sync)   # one micro-batch (the step's batch at --accum 1)
    if cuda:
        torch.cuda.empty_cache()
        # from here: CUDA graphs allocate while recording (warm-up and the next steps), not when replayed
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    step()                                          # warm-up (and compilation)
    sync()
    first_step_s = time.perf_counter() - t          # with --compile: mostly compilation (Inductor's cache helps)
    for _ in range(2):
        step()
    times = []
    for _ in range(args.bench_steps):
        sync()
        t = time.perf_counter()
        terms = step()
        sync()
        times.append(time.perf_counter() - t)
    times.sort()
    med = times[len(times) // 2]
    peak_mem = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None
    peak = matmul_peak(d.device) if cuda else None
    with torch.no_grad():
        total = objective.eq3(terms)
    out = {"impl": "icode-from-scratch", "size": "full" if paper else "tiny", "batch": args.batch,
           "accum": args.accum, "contrastive_inputs": args.contrastive_inputs, "compile": args.compile,
           "compile_mode": args.compile_mode if args.compile else None, "checkpointing": args.checkpointing,
           "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
           "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
           "step_s_median": round(med, 4), "step_s_min": round(times[0], 4), "first_step_s": round(first_step_s, 2),
           "samples_per_s": round(n / med, 2), "tflop_per_step": round(flops / 1e12, 3),
           "tflop_fwd_by_part": {k: round(v / 1e12, 3) for k, v in flops_fwd.items()},
           "achieved_tflops": round(flops / med / 1e12, 1),
           "matmul_peak_tflops": round(peak / 1e12, 1) if peak else None,
           "mfu_vs_matmul_peak": round(flops / med / peak, 3) if peak else None,
           "peak_mem_GiB": round(peak_mem, 1) if peak_mem is not None else None,
           "peak_reserved_GiB": round(torch.cuda.max_memory_reserved() / 2 ** 30, 1) if cuda else None,
           "loss": round(total.item(), 3), "encoder_fwd_bwd_s": parts,
           # graphs Inductor left without CUDA graphs under reduce-overhead (its log says why; a CPU counts all)
           "cudagraph_skips": counters["inductor"]["cudagraph_skips"] if args.compile else None,
           "encoder_fwd_bwd_batch": batch_size(mbs[0])}   # the breakdown's batch: one micro-batch, --batch
    print(json.dumps(out), flush=True)
    if args.profile:
        print(json.dumps({"profile": profile_steps(step, args.profile, cuda, sync)}), flush=True)
    return out


def encoder_breakdown(model, batch, autocast, sync):
    """Forward + backward time of each encoder alone (median of 4 after one warm-up), as the reference,
    and of two parts of "speech": the convolutional feature encoder and the positional convolution (on
    frames of the step's shape; eager, in the benchmark's process before its compiled steps, to set beside
    that convolution's time inside the compiled step and in tools/conv_bench.py's fresh process)."""
    frames = torch.randn(batch_size(batch), batch["audio_mask"].shape[1], model.speech.hidden_size,
                         device=batch["audio"].device, requires_grad=True)
    runs = {"text": lambda: model.text(batch["text_ids"], batch["text_attention"])[0],
            "speech": lambda: model.speech(batch["audio"], batch["audio_attention"])[0],
            "vision": lambda: model.vision(batch["video"])[0],
            "speech_conv_features": lambda: model.speech.feature_extractor(batch["audio"]),
            "speech_pos_conv": lambda: model.speech.pos_conv(frames)}
    out = {}
    for name, fn in runs.items():
        ts = []
        for _ in range(5):
            sync()
            t = time.perf_counter()
            with autocast():
                y = fn()
            y.float().square().mean().backward()
            sync()
            ts.append(time.perf_counter() - t)
        model.zero_grad(set_to_none=True)
        out[name] = round(sorted(ts[1:])[len(ts[1:]) // 2], 4)
    return out


def bench_args(p):
    """The benchmark's own flags, added to train.py's (the step is timed with the run's settings)."""
    p.add_argument("--bench-steps", type=int, default=10, help="timed steps")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="then profile N more steps, print where the device time goes (JSON)")


def main(argv=None):
    a = parse_args(argv, extra=bench_args)
    ignored = [f"--{k.replace('_', '-')}" for k in ("init", "text_encoder", "speech_encoder", "vision_encoder",
                                                    "video_tokenizer", "speech_tokenizer", "data", "resume")
               if getattr(a, k)]
    if ignored:
        raise SystemExit(f"tools.benchmark times a fresh --preset model on synthetic batches that carry their "
                         f"targets: {' '.join(ignored)} would be ignored")
    return benchmark(a, setup_distributed(a.device))


if __name__ == "__main__":
    main()
