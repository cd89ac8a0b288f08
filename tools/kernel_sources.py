r"""The generated source of the slowest Inductor kernels in a profiled benchmark run, to read what they do.

`python -m tools.benchmark --compile --profile N` prints a profile line whose `top` lists the kernels that took
the most device time; Inductor names its Triton kernels after the ops they fuse (`triton_per_fused_...`,
cut to 120 characters there) and keeps each kernel's source in its cache folder. This prints, for each of
the `--top` slowest Triton kernels, its time, its calls a step and the smallest cached file that defines it
(the kernel's own file: its launch heuristics, block sizes and body), so that a kernel slower than its bytes
explain can be read after the device job has ended (docs/speed.md; `tools/speed_run.sh` runs it).
With `--calls PATTERN` it also lists, for each compiled graph's wrapper in the cache (the module whose
`call` launches the graph's kernels), the ATen ops and extern kernels it calls, counted, and its lines that
match PATTERN with the comment naming their source nodes: which op of the graph a library kernel in the
profile comes from (e.g. the `at::native::reduce_kernel` sums that `callers` puts directly under the
compiled backward).

    python -m tools.kernel_sources OUT_DIR/icode_compile.jsonl runs/inductor-cache --top 6 > kernels.txt
    python -m tools.kernel_sources OUT_DIR/icode_compile.jsonl runs/inductor-cache --top 0 --calls 'aten\.sum'
"""
import argparse
import collections
import json
import os
import re
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


def wrapper_calls(sources, pattern, lines=12):
    """For each wrapper among `sources` ({path: text}; files that define `call(`), the ATen ops and extern
    kernels it calls, most first, and up to `lines` of its lines matching `pattern`, each after the nearest
    comment above it (Inductor writes the source nodes of each call there)."""
    out = []
    for path, text in sorted(sources.items()):
        if not re.search(r"^\s*def call\(", text, re.M):
            continue
        calls = collections.Counter(re.findall(r"(torch\.ops\.aten\.[\w.]+|extern_kernels\.\w+)\(", text))
        out.append(f"# wrapper {path}: " + (", ".join(f"{k} x{n}" for k, n in calls.most_common()) or "(none)"))
        comment, shown = "", 0
        for line in text.splitlines():
            if line.strip().startswith("#"):
                comment = line.strip()
            elif re.search(pattern, line) and shown < lines:
                out.append(f"  {comment[:200]}\n    {line.strip()[:200]}")
                shown += 1
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("profile", help="a file holding the benchmark's profile line (JSON)")
    p.add_argument("cache", help="Inductor's cache folder (TORCHINDUCTOR_CACHE_DIR)")
    p.add_argument("--top", type=int, default=6, help="how many of the slowest Triton kernels")
    p.add_argument("--calls", metavar="PATTERN", help="also list the graph wrappers' ATen calls and lines matching this")
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
    if args.top and not kernels:
        print("no Triton kernels in the profile's top list")
    for name, ms, calls in kernels:
        path = defining_file(name, sources)
        print(f"# {name}: {ms} ms a step, {calls} calls a step")
        if path is None:
            print(f"# (not found in {args.cache})\n")
            continue
        print(f"# {os.path.relpath(path, args.cache)}\n{sources[path].rstrip()}\n")
    if args.calls:
        print("\n".join(wrapper_calls({os.path.relpath(p, args.cache): t for p, t in sources.items()}, args.calls)))


if __name__ == "__main__":
    sys.exit(main())
