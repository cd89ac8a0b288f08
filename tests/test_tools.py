"""tools/ (the speed investigations, the benchmark, the profiler) and the documentation: the tools' alternative
forms compute what the model computes, their parsers read what they claim, and every `--flag` the
documentation names exists."""
import glob
import importlib
import os
import re
import subprocess
import sys

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
