"""The documentation names only options that exist: every `--flag` in README.md and docs/*.md is one of the
project's own argparse options (a quoted "--flag" in its Python files, docs/ scripts included) or an option
of a tool the docs call (torchrun, SLURM, the off-the-shelf reference script, pip)."""
import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OTHER_TOOLS = {  # torchrun, #SBATCH, ../shared/bench/reference_step.py, pip
    "--nproc_per_node", "--nnodes", "--node_rank", "--rdzv_backend", "--rdzv_endpoint", "--rdzv_id",
    "--nodes", "--ntasks-per-node", "--gpus-per-node", "--cpus-per-task", "--size", "--breakdown", "--no-deps"}


def test_documented_options_exist():
    sources = glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "docs", "*.py"))
    code = "".join(open(p).read() for p in sources)
    ours = set(re.findall(r"""["'](--[a-z][a-z0-9-]*)["']""", code))
    docs = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
    missing = {}
    for path in docs:
        for flag in set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]*)", open(path).read())):
            if flag not in ours and flag not in OTHER_TOOLS:
                missing.setdefault(os.path.basename(path), []).append(flag)
    assert not missing, f"documented options that no parser defines: {missing}"
