"""The generated source of the slowest Inductor kernels in a profiled benchmark run, to read what they do.

`train.py --benchmark --compile --profile N` prints a profile line whose `top` lists the kernels that took
the most device time; Inductor names its Triton kernels after the ops they fuse (`triton_per_fused_...`,
cut to 120 characters there) and keeps each kernel's source in its cache folder. This prints, for each of
the `--top` slowest Triton kernels, its time, its calls a step and the smallest cached file that defines it
(the kernel's own file: its launch heuristics, block sizes and body), so that a kernel slower than its bytes
explain can be read after the device job has ended (docs/speed.md; `docs/speed_run.sh` runs it).

    python docs/kernel_sources.py OUT_DIR/icode_compile.jsonl runs/inductor-cache --top 6 > kernels.txt
"""
import argparse
import json
import os
import sys


def profile_top(path):
    """The profile line's `top`: [[kernel name, ms a step, calls a step], ...], slowest first."""
    with open(path) as f:
        for line in f:
            if line.startswith('{"profile"'):
                return json.loads(line)["profile"]["top"]
    raise ValueError(f"no profile line in {path}")


def defining_file(name, sources):
    """The smallest of `sources` ({path: text}) that defines the function `name`, else one whose name starts
    with `name` (the profile cuts long names)."""
    for head in (f"def {name}(", f"def {name}"):
        hits = [p for p, text in sources.items() if head in text]
        if hits:
            return min(hits, key=lambda p: len(sources[p]))
    return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("profile", help="a file holding the benchmark's profile line (JSON)")
    p.add_argument("cache", help="Inductor's cache folder (TORCHINDUCTOR_CACHE_DIR)")
    p.add_argument("--top", type=int, default=6, help="how many of the slowest Triton kernels")
    args = p.parse_args(argv)
    if not os.path.isdir(args.cache):
        raise SystemExit(f"no Inductor cache folder at {args.cache}")
    sources = {}
    for root, _, files in os.walk(args.cache):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                with open(path, errors="replace") as fh:
                    sources[path] = fh.read()
    kernels = [k for k in profile_top(args.profile) if k[0].startswith("triton_")][:args.top]
    if not kernels:
        print("no Triton kernels in the profile's top list")
    for name, ms, calls in kernels:
        path = defining_file(name, sources)
        print(f"# {name}: {ms} ms a step, {calls} calls a step")
        if path is None:
            print(f"# (not found in {args.cache})\n")
            continue
        print(f"# {os.path.relpath(path, args.cache)}\n{sources[path].rstrip()}\n")


if __name__ == "__main__":
    sys.exit(main())
