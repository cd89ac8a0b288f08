"""Speed tools: the bare-step benchmark, the profiler and the speed investigations (docs/speed.md).
Run from the repository root as `python -m tools.NAME`; nothing in the project imports this folder."""
