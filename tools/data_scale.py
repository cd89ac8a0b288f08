"""Memory and start-up time of the pretraining loader on a large manifest: how the data pipeline scales to the
paper's hundreds of millions of rows (README, "Manifests").

    python -m tools.data_scale --rows 3000000                                  # one process, 2 workers
    torchrun --nproc_per_node=2 -m tools.data_scale --rows 3000000             # 2 ranks (gloo), 2 workers each

Writes (once) a manifest of `--rows` rows pointing at the toy world's clips, builds its line index (timed), then
in every rank: resident memory before, makes the loader and draws two batches, resident memory after, for the
rank and each of its DataLoader workers (Linux /proc), one JSON line per rank.
"""
import argparse
import json
import os
import time

import torch.distributed as dist

import data
from pipeline.index import build_index, index_path
from pipeline.text import load_tokenizer
from pipeline.toy import make_toy


def rss_mib(pid="self"):
    """Resident memory of a process, MiB (VmRSS: its own pages and the shared ones it touched)."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def children(pid):
    """The pids of a process's children (its DataLoader workers)."""
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(p) for p in f.read().split()]
    return out


def write_manifest(path, rows, toy):
    """`rows` rows cycling through the toy world's video clips (absolute paths)."""
    base = [json.loads(line) for line in open(os.path.join(toy, "video.jsonl"))]
    with open(path, "w") as f:
        for i in range(rows):
            r = base[i % len(base)]
            f.write(json.dumps({**r, "video": os.path.join(os.path.abspath(toy), r["video"]), "id": i}) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=3_000_000, help="rows of the manifest")
    p.add_argument("--out", default="runs/data_scale", help="folder of the manifest")
    p.add_argument("--toy-dir", default="toy", help="the toy world (made if missing)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank")
    args = p.parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        dist.init_process_group("gloo")
    path = os.path.join(args.out, f"rows{args.rows}.jsonl")
    if rank == 0:
        if not os.path.isfile(os.path.join(args.toy_dir, "tokenizer.json")):
            make_toy(args.toy_dir, size="tiny")
        if not os.path.exists(path):
            os.makedirs(args.out, exist_ok=True)
            write_manifest(path, args.rows, args.toy_dir)
        if os.path.exists(index_path(path)):
            os.remove(index_path(path))
        t = time.perf_counter()
        build_index(path)
        print(json.dumps({"rows": args.rows, "manifest_MiB": round(os.path.getsize(path) / 2 ** 20, 1),
                          "index_MiB": round(os.path.getsize(index_path(path)) / 2 ** 20, 1),
                          "index_build_s": round(time.perf_counter() - t, 2)}), flush=True)
    if world > 1:
        dist.barrier()
    tok = load_tokenizer(os.path.join(args.toy_dir, "tokenizer.json"))
    before, others = rss_mib(), set(children(os.getpid()))
    t = time.perf_counter()
    loader = data.make_loader([path], [1.0], data.TOY_DATA, tok, batch_size=4, rank=rank, world_size=world,
                              num_workers=args.workers)
    made = time.perf_counter() - t
    it = iter(loader)
    batches = [next(it) for _ in range(2)]
    line = {"rank": rank, "world": world, "rows": args.rows, "loader_s": round(made, 3),
            "two_batches_s": round(time.perf_counter() - t, 2), "rss_before_MiB": round(before, 1),
            "rss_after_MiB": round(rss_mib(), 1), "rss_growth_MiB": round(rss_mib() - before, 1),
            "workers_rss_MiB": [round(rss_mib(c), 1) for c in children(os.getpid()) if c not in others],
            "batch_rows": [len(b["index"]) for b in batches]}
    print(json.dumps(line), flush=True)
    del it
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return line


if __name__ == "__main__":
    main()
