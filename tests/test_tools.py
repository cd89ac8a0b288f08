"""tools/ (the speed investigations, the benchmark, the profiler) and the documentation: the tools' alternative
forms compute what the model computes, their parsers read what they claim, and every `--flag` the
documentation names exists."""
import contextlib
import glob
import json
import importlib
import os
import re
import subprocess
import sys

import pytest
import torch

import tools.benchmark
import tools.profile
import train
import training.speed
from icode import ICode, preset
from losses import PAPER_WEIGHTS as WEIGHTS
from tools.benchmark import synthetic_batch
from train import PretrainObjective

NOCAST = contextlib.nullcontext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OTHER_TOOLS = {  # torchrun, #SBATCH, ../shared/bench/reference_step.py, pip
    "--nproc_per_node", "--nnodes", "--node_rank", "--rdzv_backend", "--rdzv_endpoint", "--rdzv_id",
    "--nodes", "--ntasks-per-node", "--gpus-per-node", "--cpus-per-task", "--size", "--breakdown", "--no-deps"}


def tools_module(name):
    """tools/<name>.py as a module."""
    return importlib.import_module(f"tools.{name}")


def run_tool(name, *args):
    """`python -m tools.<name>` in its own process (the scripts that compile or patch modules); its stdout."""
    run = subprocess.run([sys.executable, "-m", f"tools.{name}", *args], capture_output=True, text=True, timeout=900,
                         cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def test_documented_options_exist():
    sources = [p for p in glob.glob(os.path.join(ROOT, "**", "*.py"), recursive=True)
               if not os.path.relpath(p, ROOT).startswith("tests")]
    code = "".join(open(p).read() for p in sources)
    ours = set(re.findall(r"""["'](--[a-z][a-z0-9-]*)["']""", code))
    docs = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
    missing = {}
    for path in docs:
        for flag in set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]*)", open(path).read())):
            if flag not in ours and flag not in OTHER_TOOLS:
                missing.setdefault(os.path.basename(path), []).append(flag)
    assert not missing, f"documented options that no parser defines: {missing}"


def test_conv_bench_alternatives_compute_the_same():
    """tools/conv_bench.py times two ways of computing each convolution; its alternatives not used by the model
    give the model's values and gradients: the FFT positional convolution (to the input, weight_g, weight_v,
    bias; an even kernel with HF's last-frame drop, an odd one, one longer than the sequence), the feature
    encoder as matrix products over windows (an odd length: the stride-2 layers drop a frame), MVM's
    deconvolution as a matrix product and Swin's patch embedding as the Conv3d."""
    import torch
    from common import assert_same_function
    bench = tools_module("conv_bench")
    torch.manual_seed(0)
    cases = []
    for k in (4, 127, 128):
        pc = bench.PositionalConvEmbedding(32, k, 4)
        with torch.no_grad():
            pc.bias.normal_()
            pc.weight_g.mul_(torch.rand_like(pc.weight_g) + 0.5)
        cases.append((pc, lambda x, pc=pc: bench.positional_conv_fft(pc, x), torch.randn(3, 50, 32, requires_grad=True)))
    enc = bench.ConvFeatureEncoder((16,) * 7, (10, 3, 3, 3, 3, 2, 2), (5, 2, 2, 2, 2, 2, 2), True, "layer")
    cases.append((enc, lambda x: bench.feature_encoder_windows(enc, x), torch.randn(2, 4001, requires_grad=True)))
    for model_fn, alternative, x in cases:
        assert_same_function(alternative(x), model_fn(x), [x] + list(model_fn.parameters()))
    # MVM's deconvolution (eq. (4)) as one matrix product per fused cell, on a grid with T_v != H_v != W_v
    head = bench.MVMHead(8, 5)
    grid = torch.randn(2, 2, 3, 4, 8, requires_grad=True)
    assert_same_function(bench.deconv_as_matmul(head, grid), head.upsample(grid),
                         [grid, head.deconv.weight, head.deconv.bias, head.layer_norm.weight, head.layer_norm.bias])
    # Swin's patch embedding (the model's matrix product over patches) against the Conv3d it stands for
    from icode import preset
    embed = bench.PatchEmbed3D(preset("tiny").vision)
    video = torch.randn(2, 3, 4, 36, 40, requires_grad=True)
    assert_same_function(bench.patch_embed_conv(embed, video), embed(video), [video] + list(embed.parameters()))


def test_kernel_sources_prints_the_slowest_kernels_own_files(tmp_path, capsys):
    """tools/kernel_sources.py: for the profile's slowest Triton kernels, in order and only those, the smallest
    cached file defining each (the kernel's own file, not the wrapper that embeds every kernel's source),
    matched by the profile's name cut to 120 characters; a kernel with no file says so."""
    import json
    ks = tools_module("kernel_sources")
    long = "triton_per_fused_" + "_".join(["add_mul_embedding_dense_backward"] * 6)   # > 120 characters
    cache = tmp_path / "cache"
    (cache / "ab").mkdir(parents=True)
    (cache / "cd").mkdir()
    own = f"@triton.jit\ndef {long}_7(in_ptr0, xnumel):\n    XBLOCK = 8\n"
    (cache / "ab" / "kernel.py").write_text(own)
    (cache / "cd" / "wrapper.py").write_text("import torch\n" * 50 + f"k = '''{own}'''\n"
                                             "def triton_poi_fused_gelu_3(in_ptr0):\n    pass\n")
    (cache / "cd" / "other.py").write_text("def triton_poi_fused_gelu_31(in_ptr0):\n    pass\n")  # not _3
    prof = tmp_path / "icode_compile.jsonl"
    top = [[long[:120], 8.85, 1], ["fmha_cutlassB_bf16", 22.0, 36], ["triton_poi_fused_gelu_3", 3.9, 24],
           ["triton_red_fused_sum_9", 1.0, 2]]
    prof.write_text(json.dumps({"impl": "icode"}) + "\n" + json.dumps({"profile": {"top": top}}) + "\n")
    ks.main([str(prof), str(cache), "--top", "2"])
    out = capsys.readouterr().out
    assert out.index(f"# {long[:120]}: 8.85 ms a step, 1 calls a step\n# ab/kernel.py\n{own.rstrip()}") == 0
    assert "# triton_poi_fused_gelu_3: 3.9 ms a step, 24 calls a step\n# cd/wrapper.py\n" in out
    assert "fmha" not in out and "triton_red_fused_sum_9" not in out      # not Triton; past --top 2
    ks.main([str(prof), str(cache), "--top", "3"])
    assert "# triton_red_fused_sum_9: 1.0 ms a step, 2 calls a step\n# (not found in " in capsys.readouterr().out


def test_kernel_sources_lists_the_wrappers_calls(tmp_path, capsys):
    """tools/kernel_sources.py --calls: for each compiled graph's wrapper (a file defining `call`, not a kernel's
    own file), its ATen and extern calls counted, and its lines matching the pattern under the comment above."""
    import json
    ks = tools_module("kernel_sources")
    (tmp_path / "cache" / "ab").mkdir(parents=True)
    (tmp_path / "cache" / "ab" / "kernel.py").write_text("def triton_red_fused_sum_1(in_ptr0):\n    pass\n")
    (tmp_path / "cache" / "ab" / "graph.py").write_text(
        "def call(args):\n    # Source Nodes: [mm], Original ATen: [aten.mm]\n    extern_kernels.mm(a, b, out=c)\n"
        "    # Source Nodes: [sum_3], Original ATen: [aten.sum]\n    buf3 = torch.ops.aten.sum.dim_IntList(buf2, [0])\n"
        "    extern_kernels.mm(buf3, b, out=d)\n")
    prof = tmp_path / "p.jsonl"
    prof.write_text(json.dumps({"profile": {"top": []}}) + "\n")
    ks.main([str(prof), str(tmp_path / "cache"), "--top", "0", "--calls", r"aten\.sum"])
    assert capsys.readouterr().out == (
        "# wrapper ab/graph.py: extern_kernels.mm x2, torch.ops.aten.sum.dim_IntList x1\n"
        "  # Source Nodes: [sum_3], Original ATen: [aten.sum]\n    buf3 = torch.ops.aten.sum.dim_IntList(buf2, [0])\n")


def test_bias_grad_schedule_stands_in_for_the_gpu_attention_and_reads_the_backward():
    """tools/bias_grad_schedule.py: its stand-in for CUDA's memory-efficient attention computes SDPA's values and
    gradients, the bias's included, with the bias padded as ATen pads it (a length not a multiple of 8); and the
    script finds, in the compiled backward of a 2-layer WavLM, each layer's attention backward call, where its
    bias came from, and the kernels that read its bias gradient (run in a subprocess: it swaps
    model/wavlm.py's attention)."""
    import torch
    import torch.nn.functional as F
    from common import assert_same_function
    bgs = tools_module("bias_grad_schedule")
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 13, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bias = torch.randn(2, 3, 13, 13, dtype=torch.float64, requires_grad=True)
    assert_same_function(bgs.sdpa(q, k, v, bias), F.scaled_dot_product_attention(q, k, v, attn_mask=bias),
                         [q, k, v, bias])
    out = run_tool("bias_grad_schedule", "--layers", "2", "--seconds", "0.5")
    calls = re.findall(r"attention backward of layer (\d): its bias \w+ (saved by the forward|rebuilt in the backward)", out)
    assert [layer for layer, _ in calls] == ["1", "0"], out          # the backward runs last layer first
    read = [set(map(int, m.split(", "))) for m in re.findall(r"reads the bias gradients of layers \[([\d, ]+)\]", out)]
    assert set().union(*read) == {0, 1}, out   # every layer's bias gradient is read by some kernel


def test_bias_grad_bench_gated_bias_is_addcmul_with_its_gradients():
    """tools/bias_grad_bench.py's GatedBias is torch.addcmul(pad, gate, P) with a hand-written backward (P's
    gradient as one batched product): float64 gradcheck, and the same gradients as addcmul's for an upstream
    gradient with padded rows (the memory-efficient attention backward's layout); the script's CPU check runs
    its three variants (the model's way among them) compiled and reports the same gradients (in a subprocess:
    it compiles and resets Dynamo)."""
    import json

    import torch
    bgb = tools_module("bias_grad_bench")
    torch.manual_seed(0)
    B, H, T = 3, 2, 7
    pad = torch.randn(B, 1, 1, T, dtype=torch.float64)
    gate = torch.randn(B, H, T, 1, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(H, T, T, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda g, p: bgb.GatedBias.apply(pad, g, p), (gate, pos))
    up = torch.randn(B, H, T, T + 5, dtype=torch.float64)[..., :T]        # rows padded to T + 5
    ours = torch.autograd.grad(bgb.GatedBias.apply(pad, gate, pos), (gate, pos), up)
    ref = torch.autograd.grad(torch.addcmul(pad, gate, pos), (gate, pos), up)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    lines = [json.loads(line) for line in run_tool("bias_grad_bench", "--small", "--iters", "1").splitlines()
             if line.startswith("{")]
    assert [r["variant"] for r in lines] == ["shared_lookup", "per_layer_bmm", "per_layer_toeplitz"]
    assert all(r["grad_max_rel_diff_vs_shared_lookup"] < 1e-5 and r["fwd_bwd_ms"] > 0 for r in lines)


def test_benchmark_json_and_profile_add_up(capsys, monkeypatch):
    """tools.benchmark --profile on the tiny preset (CPU), with the run's --accum and --contrastive-inputs: the
    reference's fields, samples/s = batch x accum / median step, and the profile's kinds add up to its busy time;
    the step runs --accum micro-batches of --batch with the run's LRs, weight decay and clip."""
    import json
    seen = {"micro": [], "opt": [], "clip": []}
    real_step, real_opt, real_clip = train.train_step, train.build_optimizer, training.speed.clip_and_step
    bench = tools.benchmark
    monkeypatch.setattr(bench, "train_step", lambda obj, runner, mbs, *a: seen["micro"].append(
        [train.batch_size(mb) for mb in mbs]) or real_step(obj, runner, mbs, *a))
    monkeypatch.setattr(bench, "build_optimizer", lambda model, *a, **k: seen["opt"].append(a) or real_opt(model, *a, **k))
    monkeypatch.setattr(bench, "clip_and_step", lambda opt, ps, norm, c: seen["clip"].append(c) or
                        real_clip(opt, ps, norm, c))
    out = bench.main(["--preset", "tiny", "--batch", "1", "--accum", "2", "--bench-steps", "3",
                      "--profile", "1", "--device", "cpu", "--lr-fusion", "1e-4", "--lr-encoders", "2e-5",
                      "--weight-decay", "0.05", "--clip", "0.5"])
    assert set(map(tuple, seen["micro"])) == {(1, 1)} and seen["opt"] == [(1e-4, 2e-5, 0.05)]
    assert set(seen["clip"]) == {0.5}
    lines = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
    assert lines[0] == out and (out["accum"], out["contrastive_inputs"]) == (2, "unmasked")  # the tiny default
    for k in ("samples_per_s", "step_s_median", "tflop_per_step", "peak_mem_GiB", "encoder_fwd_bwd_s"):
        assert k in out
    assert out["samples_per_s"] == pytest.approx(2 / out["step_s_median"], rel=1e-2)
    assert out["tflop_per_step"] > 0 and set(out["encoder_fwd_bwd_s"]) == {
        "text", "speech", "vision", "speech_conv_features", "speech_pos_conv"}
    assert all(v > 0 for v in out["encoder_fwd_bwd_s"].values())
    assert out["encoder_fwd_bwd_batch"] == 1     # the breakdown times one micro-batch of --batch, not the step's 2
    assert out["first_step_s"] >= out["step_s_min"] - 0.005  # the warm-up step (compilation, with --compile)
    # units: the FLOPs of one step (counted again here, the unmasked pass included), in TFLOP; achieved =
    # those over the median step
    obj = PretrainObjective(ICode(preset("tiny")), WEIGHTS, unmasked_contrastive=True)
    b = synthetic_batch(obj.model.cfg, 2, device="cpu", **tools.benchmark.BENCH_SHAPES["tiny"])
    assert out["tflop_per_step"] == pytest.approx(training.speed.count_flops(obj, b, NOCAST) / 1e12, rel=2e-2, abs=1e-3)
    assert out["achieved_tflops"] == pytest.approx(out["tflop_per_step"] / out["step_s_median"], rel=2e-2, abs=0.1)
    prof = lines[1]["profile"]
    assert sum(prof["by_kind_ms"].values()) == pytest.approx(prof["busy_ms"], abs=0.05 * len(prof["by_kind_ms"]))
    assert 0 < prof["busy_ms"] and prof["top"][0][1] <= prof["busy_ms"]
    assert set(prof["callers"]) == {name for name, _, _ in prof["top"]}  # who launched each (on a CPU: ops)
    assert all(sum(ms for _, ms, _ in prof["callers"][name]) <= t + 0.03 for name, t, _ in prof["top"])
    ops = prof["top_ops"]
    assert ops and all(r[2] <= prof["busy_ms"] for r in ops) and [r[2] for r in ops] == sorted((r[2] for r in ops), reverse=True)
    assert any(r[0] in ("aten::addmm", "aten::mm") and r[4] is not None for r in ops)  # matrix products, with their rate


def test_callers_file_each_op_under_the_ops_around_it():
    """`callers` (the profile's answer to "which op launched this kernel?", here on CPU ops): each addmm under
    the chain of ops around it, with its calls and its time per step, the chains adding up to the op's own time."""
    from torch.profiler import ProfilerActivity, profile, record_function
    x, w, b = torch.randn(512, 512), torch.randn(512, 512), torch.randn(512)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):                      # two "steps"
            with record_function("outer"):
                torch.nn.functional.linear(x, w, b)
                torch.nn.functional.linear(x, w, b)
            torch.addmm(b, x, w.t())
    rows = tools.profile.callers(prof, ["aten::addmm"], 2, cuda=False)["aten::addmm"]
    assert {chain: calls for chain, _, calls in rows} == {"aten::linear < outer": 2, "(none)": 1}
    own_ms = next(e.self_cpu_time_total for e in prof.key_averages() if e.key == "aten::addmm") / 2 / 1e3
    assert sum(ms for _, ms, _ in rows) == pytest.approx(own_ms, abs=0.02)
    assert rows[0][0] == "aten::linear < outer"  # the most time first: two calls against one


def test_matmul_flop_from_recorded_shapes():
    """matmul_flop on the shapes torch.profiler records (linear -> addmm with the bias first, bmm, mm with out=):
    2 * batch * M * K * N; None for other ops."""
    from torch.profiler import ProfilerActivity, profile
    x, w, b = torch.randn(64, 32), torch.randn(16, 32), torch.randn(16)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        torch.nn.functional.linear(x, w, b)
        torch.bmm(torch.randn(3, 5, 7), torch.randn(3, 7, 2))
        torch.mm(x, w.t(), out=torch.empty(64, 16))
    flops = {e.key: tools.profile.matmul_flop(e.key, e.input_shapes) for e in prof.key_averages(group_by_input_shape=True)}
    assert flops["aten::addmm"] == 2 * 64 * 32 * 16
    assert flops["aten::bmm"] == 2 * 3 * 5 * 7 * 2
    assert flops["aten::mm"] == 2 * 64 * 32 * 16
    assert flops["aten::linear"] is None and tools.profile.matmul_flop("aten::mm", [[4, 3], [5, 2]]) is None


@pytest.mark.parametrize("name, kind", [
    ("fmha_cutlassB_bf16_aligned_64x64_k64_sm80", "attention"),
    ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4>>", "attention"),
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "convolution"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopB_NNT", "matmul"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
    ("triton_tem_fused_mm_0", "matmul"),
    ("triton_per_fused__scaled_dot_product_efficient_attention_native_layer_norm_3", "fused (inductor)"),
    ("void at::native::elementwise_kernel<128, 4, direct_copy_kernel_cuda>", "copy / layout"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float, float>", "normalisation"),
    ("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>", "optimizer"),
    ("void at::native::vectorized_elementwise_kernel<4, GeluCUDAKernelImpl>", "element-wise / other"),
])
def test_kernel_kinds(name, kind):
    assert tools.profile.kernel_kind(name) == kind


def test_device_time_counts_kernels_once():
    """Annotation spans on the device timeline (Optimizer.step, Inductor's graph calls) cover kernels and
    must not be added to them; the CUDA branch of --profile, on events built by hand."""
    from types import SimpleNamespace as E

    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import Interval

    def ev(name, t0, t1, dev=DeviceType.CUDA, **kw):
        return E(name=name, device_type=dev, time_range=Interval(t0, t1), **kw)

    kernels = [ev("nvjet_gemm", 0, 30, activity_type="kernel"), ev("triton_poi_fused_0", 30, 35, activity_type="kernel"),
               ev("nvjet_gemm", 40, 70, activity_type="kernel"), ev("Memcpy DtoD", 70, 72, activity_type="gpu_memcpy")]
    spans = [ev("## Call CompiledFxGraph abc ##", 0, 40, activity_type="gpu_user_annotation", is_user_annotation=True),
             ev("Optimizer.step#AdamW.step", 40, 72, activity_type="gpu_user_annotation", is_user_annotation=True),
             ev("aten::mm", 0, 70, dev=DeviceType.CPU, activity_type="cpu_op")]
    expected = {"nvjet_gemm": [60.0, 2], "triton_poi_fused_0": [5.0, 1], "Memcpy DtoD": [2.0, 1]}
    assert tools.profile.device_time_by_kernel(kernels + spans, DeviceType.CUDA) == expected
    # older torch: no activity_type on events; the annotation flag and the "## " prefix still filter
    old = [E(**{k: v for k, v in vars(e).items() if k != "activity_type"}) for e in kernels + spans]
    assert tools.profile.device_time_by_kernel(old, DeviceType.CUDA) == expected


def test_device_idle_files_each_gap_under_the_launch_after_it():
    """device_idle on events built by hand (two steps): the gaps between pieces of device work, each under the
    outermost op around the CPU op that launched the work after it (not the profiler's own spans), per step;
    spans and overlaps are no gaps."""
    from types import SimpleNamespace as E

    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import Interval

    flush = E(name="Buffer Flush", id=6, cpu_parent=None, device_type=DeviceType.CPU)   # CUPTI's, around a step
    fwd = E(name="CompiledFunction", id=1, cpu_parent=flush, device_type=DeviceType.CPU)
    launch_f = E(name="triton_poi_fused_0", id=2, device_type=DeviceType.CPU, cpu_parent=E(
        name="## Call CompiledFxGraph f ##", id=3, cpu_parent=fwd, device_type=DeviceType.CPU))
    opt = E(name="Optimizer.step#AdamW.step", id=4, cpu_parent=None, device_type=DeviceType.CPU)
    launch_o = E(name="aten::_fused_adamw_", id=5, cpu_parent=opt, device_type=DeviceType.CPU)
    events, t = [flush, fwd, launch_f, launch_f.cpu_parent, opt, launch_o], 0
    for _ in range(2):      # per step: gemm, 5 us, two fused kernels, the second inside the first, 20 us, AdamW
        events += [E(name="nvjet_gemm", device_type=DeviceType.CUDA, time_range=Interval(t, t + 30),
                     activity_type="kernel", linked_correlation_id=2, id=0),
                   E(name="triton_poi_fused_0", device_type=DeviceType.CUDA, time_range=Interval(t + 35, t + 45),
                     activity_type="kernel", linked_correlation_id=2, id=0),
                   E(name="triton_poi_fused_0", device_type=DeviceType.CUDA, time_range=Interval(t + 38, t + 42),
                     activity_type="kernel", linked_correlation_id=2, id=0),
                   E(name="## Call CompiledFxGraph f ##", device_type=DeviceType.CUDA, time_range=Interval(t, t + 45),
                     activity_type="gpu_user_annotation", is_user_annotation=True, id=0),
                   E(name="multi_tensor_apply_kernel", device_type=DeviceType.CUDA, time_range=Interval(t + 65, t + 90),
                     activity_type="kernel", linked_correlation_id=5, id=0)]
        t += 100            # 10 us from one step's AdamW to the next step's gemm: launched by the forward
    out = tools.profile.device_idle(events, 2, DeviceType.CUDA, top=2)
    assert out["kernels"] == 4 and out["idle_ms"] == pytest.approx((5 + 20 + 10 / 2) / 1e3, abs=1e-4)
    assert out["by_region"] == {"Optimizer.step#AdamW.step": [0.02, 1], "CompiledFunction": [0.01, 1]}
    assert out["largest"] == [[0.02, "triton_poi_fused_0", "multi_tensor_apply_kernel", "Optimizer.step#AdamW.step"]] * 2


def test_data_scale_measures_the_loader(toy_small, tmp_path, capsys):
    """tools/data_scale.py on a 2,000-row manifest: the index is built and timed, the loader draws two batches
    of 4 rows, resident memory is read for the process and its worker."""
    line = tools_module("data_scale").main(["--rows", "2000", "--out", str(tmp_path), "--toy-dir", toy_small,
                                            "--workers", "1"])
    first = json.loads(capsys.readouterr().out.splitlines()[0])
    index = tmp_path / "rows2000.jsonl.index.npy"
    assert first["rows"] == 2000 and first["index_build_s"] >= 0
    assert os.path.getsize(index) == 128 + 16 * 2001            # the .npy header, then (offset, line) a row
    assert line["batch_rows"] == [4, 4] and line["rss_after_MiB"] > 0 and len(line["workers_rss_MiB"]) == 1
