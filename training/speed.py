"""What makes the training step fast on GPUs, and what measures it: bf16 autocast and TF32, torch.compile of the
objective, activation checkpointing, FLOPs and throughput (docs/speed.md). None of it changes what is computed.
"""
import contextlib
import copy

import torch

from losses import count_targets


def precision(bf16, device):
    """bf16 autocast ("auto": on GPUs) and TF32 matrix products on GPUs; float32 on CPUs.
    Returns a factory of the autocast context (a no-op context when off)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        # Time cuDNN's algorithms once per input shape and keep the fastest (the speech feature encoder,
        # WavLM's grouped positional convolution; Swin's patch embedding and MVM's deconvolution are matrix
        # products). Frames and the 8 s audio cut keep the shapes few (data.py pads to the batch maximum;
        # with --compile, to the maxima).
        torch.backends.cudnn.benchmark = True
    if bf16 == "on" or (bf16 == "auto" and device.type == "cuda"):
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def torch_version():
    """(major, minor) of the installed torch: (2, 13) for "2.13.0+cpu"."""
    return tuple(int(x) for x in torch.__version__.split(".")[:2])


def compile_step(module, mode="default", backend="inductor", eager_random=False):
    """torch.compile of the pretraining objective as one graph per modality set.

    The heads select the masked positions (model/heads.py), a count that depends on the data: by default
    Dynamo breaks the graph there, 12 breaks in all. Capturing such output shapes keeps the selection in
    the graph, with the count as a symbol: one graph, no recompilation when the count changes
    (tests/test_train.py checks both). The step still waits for the count once per head (the sync of
    `nonzero`). Each modality set a source brings (7 at most) is its own graph, and a batch shortened by
    bad rows (`common_batch`) makes the batch size dynamic once more: room for both beyond Dynamo's default
    of 8 compilations per function (past it a function runs eagerly). cache_size_limit is
    recompile_limit's name before torch 2.7 (both work in later versions). `backend`: tests trace with
    Dynamo alone.

    eager_random: Inductor's generated kernels draw dropout masks from their own seeds, so restoring the RNG
    state does not repeat an eager pass's masks in a compiled one. Gradient cache (train_step with more than
    one micro-batch) computes the cached representations eagerly and recomputes them through this compiled
    module, and needs the same masks both times; `fallback_random` makes Inductor draw them with eager's
    random ops, in eager's order (tests/test_train.py checks the compiled cached step against the eager one,
    tiny preset with dropout on).
    It costs a separate kernel per random draw, so it is on only where needed (train.py: --accum > 1).
    With it the graph breaks at the heads' selections again: inside one graph Inductor may schedule a draw
    that does not depend on a selection ahead of one that does, out of eager's order (seen with torch 2.10.0
    to 2.12.1, not 2.13.0: other masks, gradients off by 1.5-2.7x a tensor's largest entry). Before torch
    2.10 the masks differ even so (2.8.0, 2.9.1: off by 0.84x): refused there."""
    if eager_random and torch_version() < (2, 10):
        raise ValueError(f"--compile with gradient cache (--accum > 1) needs torch >= 2.10, this is "
                         f"{torch.__version__}: its compiled step draws other dropout masks than the eager pass, "
                         f"so the recomputed representations would not be the cached ones. Use --accum 1, leave "
                         f"out --compile, or upgrade torch")
    torch._dynamo.config.capture_dynamic_output_shape_ops = not eager_random
    if eager_random:
        torch._inductor.config.fallback_random = True
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
    return torch.compile(module, backend=backend, **({"mode": mode} if backend == "inductor" else {}))


def clip_and_step(opt, params, norm, max_norm):
    """The optimiser step on gradients clipped to global L2 norm `max_norm`, given their norm before clipping,
    `norm` (torch.nn.utils.get_total_norm): clip_grad_norm_'s scaling by min(1, max_norm / (norm + 1e-6)).

    A fused AdamW (the GPU's, build_optimizer) takes the scaling into its own kernel: it divides every gradient
    by the optimiser's `grad_scale` as it reads it (the hook torch.amp.GradScaler unscales through), which
    saves clip_grad_norm_'s separate multiplication, a pass reading and writing every gradient (docs/speed.md).
    Otherwise: clip_grad_norm_'s own multiplication, then the step (tests/test_train.py checks both against it).
    """
    if all(g.get("fused") for g in opt.param_groups):
        opt.grad_scale = ((norm + 1e-6) / max_norm).clamp(min=1.0).float()  # divide by max(1, norm / max_norm)
        try:
            opt.step()
        finally:
            del opt.grad_scale
    else:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        opt.step()


def transformer_blocks(model):
    """Every Transformer block of the encoders and the fusion network (the units worth checkpointing)."""
    blocks = list(model.text.encoder.layer) + list(model.speech.layers) + list(model.fusion.layers)
    blocks += [blk for stage in model.vision.stages for blk in stage.blocks]
    return blocks


def enable_checkpointing(model):
    """Activation checkpointing: each block keeps only its input and recomputes the rest in backward
    (RNG state preserved by torch.utils.checkpoint, so dropout matches). Parameter names are unchanged."""
    from functools import partial

    from torch.utils.checkpoint import checkpoint
    for blk in transformer_blocks(model):
        blk.forward = partial(checkpoint, type(blk).forward.__get__(blk), use_reentrant=False)


FLOP_PARTS = {"text": ("text",), "speech": ("speech",), "vision": ("vision",), "fusion": ("fusion",),
              "heads": ("mlm_head", "mvm_head", "msm_head")}


def count_flops(objective, mb, autocast, by_part=False):
    """FLOPs of one micro-batch forward + backward, counted once with torch.utils.flop_counter. With
    by_part, also {part: forward FLOPs} for the encoders, the fusion network and the heads (the forward
    only: the counter's attribution of backward operations to modules is not reliable). The heads' padding
    rows under `static_rows` are not counted: the exact selection's work, the same in every mode."""
    from torch.utils.flop_counter import FlopCounterMode
    objective = copy.copy(objective)           # the exact selection: no static rows
    objective.static_rows = None
    model = objective.model
    targets = model.targets(mb)
    norms = count_targets(targets, model.cfg.msm_combined)
    with FlopCounterMode(display=False, depth=2) as fc:
        with autocast():
            loss, _ = objective(mb, targets, norms, 1)
        fwd = {name: sum(c.values()) for name, c in fc.get_flop_counts().items()}
        loss.backward()
    model.zero_grad(set_to_none=True)
    if not by_part:
        return fc.get_total_flops()
    root = type(objective).__name__
    parts = {part: sum(fwd.get(f"{root}.model.{m}", 0) for m in mods) for part, mods in FLOP_PARTS.items()}
    return fc.get_total_flops(), parts


PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}  # dense bf16


def peak_flops(device):
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def step_rates(n_step, dt, world, flops_per_sample=None, peak=None):
    """One step's throughput: n_step samples over all `world` ranks in dt seconds -> global samples/s, per
    device, and (given the FLOPs of one sample's forward + backward and one device's peak FLOP/s) the model
    FLOPs utilisation (PaLM, Chowdhery et al. 2022, app. B): recomputation (the gradient cache's first pass
    with --accum > 1, --checkpointing) is work the GPU does but MFU does not count."""
    out = {"samples_per_s": round(n_step / dt, 2), "samples_per_s_per_device": round(n_step / dt / world, 2)}
    if flops_per_sample and peak:
        out["mfu"] = round(flops_per_sample * n_step / dt / world / peak, 4)
    return out
