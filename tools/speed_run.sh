#!/usr/bin/env bash
# The measurement of docs/speed.md in one job on one GPU, back to back on the same card:
#   1. the off-the-shelf reference step (transformers + torchvision), one JSON line;
#   2. with CONVS=1 (and under SMOKE=1), the step's four convolutions, each as the model computes it and the
#      other way (tools/conv_bench.py; docs/measured/2026-11-27-h100/conv_bench.jsonl has the H100's lines,
#      so it is left out by default: its ~15-20 s are the compiled step's margin in a 10-minute job);
#   3. this project's paper-preset step with torch.compile (MODE, default reduce-overhead: CUDA graphs over
#      the sync-free step; MODE=default for torch.compile alone), one JSON line, then its profile (JSON);
#   4. with EAGER=1 (or when step 3 failed early), this project's eager step and its profile;
#   5. the data loader's decode rate for the paper-preset clip shape;
#   after 3, the source of the profile's slowest Triton kernels and the compiled graphs' ATen calls, their
#   `aten.sum` lines shown (tools/kernel_sources.py; on a GPU only).
# Usage, from the repository root:  bash tools/speed_run.sh OUT_DIR [path/to/reference_step.py]
# SMOKE=1 runs the reference and icode steps at toy size (batch 2, tiny preset), conv_bench at the paper's
# shapes with batch 1, the decode bench as always, and no nvidia-smi: a check on a CPU.
# About 9.5 minutes on a fresh H100, most of it compiling (about 2.5 minutes with Inductor's cache filled);
# each part has its own time limit, so one that fails or hangs still leaves the others' lines in OUT_DIR, and
# the compiled step gets the most (540 s): in a job cut at 10 minutes, what it printed is already in OUT_DIR.
set -u
out=${1:?usage: bash tools/speed_run.sh OUT_DIR [reference_step.py]}
ref=${2:-../shared/bench/reference_step.py}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# Inductor's compiled kernels in an ignored folder of the checkout: a second run on the same machine skips
# most of the compilation (the first takes ~4 minutes of the ~8).
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/runs/inductor-cache}
if [ "${SMOKE:-0}" = 1 ]; then
    size="--size tiny --batch 2 --steps 2"; preset="--preset tiny --batch 2 --bench-steps 2 --device cpu"
    convs="--batch 1 --iters 1"
else
    size="--size full --batch 24"; preset="--preset paper --batch 24"; convs="--batch 24"
    nvidia-smi -L
    python -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
fi

part() {  # part NAME SECONDS COMMAND...: run with a limit, keep stderr, print and keep the JSON lines
    local name=$1 limit=$2; shift 2
    echo "== $name"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>"$out/$name.log" | grep --line-buffered '^{' | tee "$out/$name.jsonl"
    echo "   ($name: $((SECONDS - t0)) s, exit ${PIPESTATUS[0]}; stderr tail:)"
    tail -n 3 "$out/$name.log" | cut -c1-300
}

part reference 120 python "$ref" $size --breakdown
if [ "${CONVS:-0}" = 1 ] || [ "${SMOKE:-0}" = 1 ]; then
    part conv_bench 60 python -m tools.conv_bench $convs
fi
part icode_compile 540 python -m tools.benchmark $preset --compile --compile-mode "${MODE:-reduce-overhead}" --profile 2
grep -m 3 "skipping cudagraphs" "$out/icode_compile.log" | cut -c1-300   # why a graph ran without CUDA graphs
# The generated source of the profile's slowest Triton kernels, to read once the job has ended.
if [ -s "$out/icode_compile.jsonl" ] && [ -d "$TORCHINDUCTOR_CACHE_DIR" ]; then
    timeout 30 python -m tools.kernel_sources "$out/icode_compile.jsonl" "$TORCHINDUCTOR_CACHE_DIR" --top 8 --calls 'aten\.sum' \
        >"$out/kernels.txt" 2>&1
    echo "== kernels: $(grep -c '^# triton_' "$out/kernels.txt") kernel sources in kernels.txt"
fi
# The eager step on request, or when the compiled one printed nothing (a compiler failure) early enough for
# the eager step (~2 minutes) to fit in a 10-minute job.
if [ "${EAGER:-0}" = 1 ] || { [ ! -s "$out/icode_compile.jsonl" ] && [ "$SECONDS" -lt 400 ]; }; then
    part icode_eager 180 python -m tools.benchmark $preset --profile 2
fi
echo "== decode"
timeout 60 python -m pipeline bench --clip360p -n 32 2>&1 | tail -n 4 | tee "$out/decode.txt"
