"""Where the device time of a training step goes: torch.profiler over a few steps, kernels by kind, the ops that
launched them, the aten ops by input shapes, the device's idle gaps (`python -m tools.benchmark --profile N`).
"""
import collections
import math
import re
import time

# Kinds of kernels (or CPU ops), by name; the first pattern that matches wins. Inductor names its Triton
# kernels after the ops they fuse (triton_tem_*: matmul templates), cuDNN convolution kernels have "gemm"
# in their names and attention kernels "fmha" or "attention", hence the order.
KERNEL_KINDS = (
    ("matmul", r"^triton_tem"),
    ("fused (inductor)", r"^triton_"),
    ("attention", r"fmha|flash|attention|attn"),
    ("convolution", r"conv|fprop|dgrad|wgrad|cudnn"),
    ("matmul", r"gemm|nvjet|cublas|cutlass|aten::(mm|addmm|bmm|matmul|linear)$"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("copy / layout", r"copy|transpose|permute|contiguous|cat|pad|roll|index|gather|scatter|memcpy|memset|clone"),
    ("normalisation", r"norm"),
)


def kernel_kind(name):
    return next((kind for kind, pat in KERNEL_KINDS if re.search(pat, name, re.IGNORECASE)), "element-wise / other")


def device_work(events, device_type):
    """The profiler's device-side work: kernels, copies and memsets. The device side also holds the spans of
    record_function ranges (Optimizer.step, Inductor's "## Call CompiledFxGraph ..."), which cover other
    kernels and would count them twice: left out."""
    device = [e for e in events if e.device_type == device_type
              and not getattr(e, "is_user_annotation", False) and not e.name.startswith("## ")]
    work = [e for e in device if getattr(e, "activity_type", None) in ("kernel", "gpu_memcpy", "gpu_memset")]
    return work or device      # torch versions without activity_type: the annotation filter alone


def device_time_by_kernel(events, device_type):
    """{kernel name: [microseconds, calls]} over the profiler's device-side work."""
    totals = {}
    for e in device_work(events, device_type):
        acc = totals.setdefault(e.name, [0.0, 0])
        acc[0] += e.time_range.elapsed_us()
        acc[1] += 1
    return totals


# The profiler's own CPU-side spans (CUPTI overhead records), never the region that launched a kernel.
PROFILER_OVERHEAD = ("Buffer Flush", "Command Buffer Full", "Activity Buffer Request", "Instrumentation", "Resource")


def device_idle(events, n, device_type, top=5):
    """Where the device waits, per step: the gaps between consecutive pieces of device work (nothing runs: the
    next kernel was not launched yet, or the CPU was waiting on the device), each filed under the outermost op
    around the CPU op that launched the kernel after it ("Torch-Compiled Region: 0/0": a compiled forward;
    "autograd::engine::evaluate_function: CompiledFunctionBackward": its backward; "Optimizer.step#AdamW.step";
    an eager aten op). Their sum is the part of the step that faster kernels do not shorten. Returns
    {"kernels": per step, "idle_ms": per step, "by_region": {region: [ms, gaps]},
     "largest": [[ms, kernel before, kernel after, region], ...]}."""
    work = sorted(device_work(events, device_type), key=lambda e: e.time_range.start)
    # the CPU ops a kernel can link to (the profiler's own rule: events linked to nothing, e.g. not cudaLaunchKernel)
    cpu = {e.id: e for e in events if e.device_type != device_type and not getattr(e, "linked_correlation_id", 0)}
    gaps, end, last = [], None, None   # end: when all earlier work has ended (kernels may overlap); last: that work
    for e in work:
        if end is not None and e.time_range.start > end:
            gaps.append((e.time_range.start - end, last, e))
        if end is None or e.time_range.end > end:
            end, last = e.time_range.end, e
    by, rows = collections.defaultdict(lambda: [0.0, 0]), []
    for us, a, b in gaps:
        op, outer = cpu.get(getattr(b, "linked_correlation_id", 0)), None
        while op is not None:          # the outermost op that is not the profiler's own (CUPTI's buffer
            if not (getattr(op, "activity_type", None) == "overhead" or op.name in PROFILER_OVERHEAD):
                outer = op             # flushes enclose whole steps: on the H100 every gap was filed there)
            op = op.cpu_parent
        region = outer.name[:60] if outer is not None else "(unknown)"
        by[region][0] += us
        by[region][1] += 1
        rows.append((us, a.name[:60], b.name[:60], region))
    return {"kernels": len(work) // n, "idle_ms": per_step_ms(sum(r[0] for r in rows), n),
            "by_region": {r: [per_step_ms(us, n), k // n] for r, (us, k) in sorted(by.items(), key=lambda kv: -kv[1][0])},
            "largest": [[round(us / 1e3, 3), *rest] for us, *rest in sorted(rows, reverse=True)[:top]]}


# Where the two matrices of an aten matrix product sit among its recorded input shapes (addmm / baddbmm:
# after the added term).
_MATMUL_ARGS = {"aten::mm": 0, "aten::bmm": 0, "aten::addmm": 1, "aten::baddbmm": 1}


def matmul_flop(name, shapes):
    """FLOPs of one call of an aten matrix product ([..., M, K] @ [..., K, N]: 2 * batch * M * K * N) from the
    input shapes the profiler records for it; None for any other op."""
    i = _MATMUL_ARGS.get(name)
    if i is None or len(shapes) < i + 2:
        return None
    a, b = shapes[i], shapes[i + 1]
    if len(a) < 2 or len(b) < 2 or a[-1] != b[-2]:
        return None
    return 2 * math.prod(a[:-2]) * a[-2] * a[-1] * b[-1]


def per_step_ms(us, n):
    """Microseconds summed over n profiled steps -> milliseconds per step."""
    return round(us / n / 1e3, 2)


def op_table(prof, n, cuda, top):
    """The `top` aten ops by (name, input shapes) that ran work themselves (device time on a GPU, CPU self
    time on a CPU), per step: [name, shapes, ms, calls, TFLOP/s for matrix products]. The shapes say which
    encoder an op belongs to (width 1024: speech; 128-1024 in windows of 196: vision; ...). Under
    torch.compile only what Inductor hands to extern kernels (matrix products, convolutions, attention)
    is an aten op; its own Triton kernels are in the kernel list."""
    rows = []
    for e in prof.key_averages(group_by_input_shape=True):
        us = e.self_device_time_total if cuda else e.self_cpu_time_total
        if us > 0 and e.key.startswith("aten::"):   # not the record_function spans around them
            flop = matmul_flop(e.key, e.input_shapes)
            rows.append([e.key, str(e.input_shapes)[:160], per_step_ms(us, n), e.count // n,
                         round(flop * e.count / (us * 1e6), 2) if flop else None])
    return sorted(rows, key=lambda r: -r[2])[:top]


def callers(prof, names, n, cuda, depth=3, per_name=3):
    """Who launched each of `names` (kernels on a GPU, ops on a CPU): {name[:120]: [[chain, ms, calls], ...]}
    per step, the `per_name` chains with the most time. A chain is the launching op and up to `depth` - 1
    of its enclosing ops, innermost first ("aten::sum < aten::convolution_backward < ## Call CompiledFxGraph
    ..."; names cut at 60 characters). On a GPU the launching op is the CPU op the profiler links the kernel
    to; on a CPU the chain starts at the op's parent. It attributes kernels that the kernel list names only
    by their library function (at::native::reduce_kernel: a `sum` from which op?)."""
    wanted, acc = set(names), collections.defaultdict(lambda: collections.defaultdict(lambda: [0.0, 0]))
    for e in prof.events():
        if cuda:
            items = [(k.name, k.duration, e) for k in e.kernels if k.name in wanted]
        else:
            items = [(e.name, e.self_cpu_time_total, e.cpu_parent)] if e.name in wanted else []
        for name, us, launcher in items:
            chain = []
            while launcher is not None and len(chain) < depth:
                chain.append(launcher.name[:60])
                launcher = launcher.cpu_parent
            cell = acc[name][" < ".join(chain) or "(none)"]
            cell[0] += us
            cell[1] += 1
    return {name[:120]: [[chain, per_step_ms(us, n), calls // n] for chain, (us, calls)
                         in sorted(rows.items(), key=lambda kv: -kv[1][0])[:per_name]]
            for name, rows in acc.items()}


def profile_steps(step, n, cuda, sync, top=25):
    """Run `step` n times under torch.profiler. Returns per step: wall time, device-busy time (the sum of
    kernel times; on a CPU the ops' self times), that time by kernel kind, the `top` kernels, the ops that
    launched them (`callers`), the `top` aten ops by input shapes (`op_table`) and, on a GPU, where the
    device idles (`device_idle`, from n more steps profiled without shapes, with their own wall_ms). The
    profiler slows the CPU side, recording shapes more: read wall_ms and idle_ms as upper bounds, busy_share
    as a lower one."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    def profiled(record_shapes):   # n steps under the profiler: (the profile, wall seconds a step)
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []),
                     record_shapes=record_shapes) as p:
            sync()
            t = time.perf_counter()
            for _ in range(n):
                step()
            sync()
        return p, (time.perf_counter() - t) / n

    prof, wall = profiled(record_shapes=True)
    if cuda:   # kernels do not nest: their durations add up to the busy time of the device
        totals = device_time_by_kernel(prof.events(), DeviceType.CUDA)
        quiet, quiet_wall = profiled(record_shapes=False)      # no shapes: less CPU time added
        idle = {"wall_ms": round(quiet_wall * 1e3, 1), **device_idle(quiet.events(), n, DeviceType.CUDA)}
    else:      # CPU ops nest: use self times
        totals = {e.key: [e.self_cpu_time_total, e.count] for e in prof.key_averages() if e.self_cpu_time_total > 0}
        idle = None
    busy = sum(us for us, _ in totals.values())
    kinds = collections.Counter()
    for name, (us, _) in totals.items():
        kinds[kernel_kind(name)] += us
    ms = lambda us: per_step_ms(us, n)
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]
    return {"steps": n, "wall_ms": round(wall * 1e3, 1), "busy_ms": ms(busy),
            "busy_share": round(busy / 1e6 / n / wall, 3),
            "by_kind_ms": {k: ms(v) for k, v in kinds.most_common()},
            "top": [[name[:120], ms(us), calls // n] for name, (us, calls) in ranked],
            "callers": callers(prof, [name for name, _ in ranked], n, cuda),
            "top_ops": op_table(prof, n, cuda, top), "device_idle": idle}
