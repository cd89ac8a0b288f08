"""The data commands (`python -m pipeline COMMAND`): make the toy world, check manifests, time decoding, write
offline VQ targets.

    python -m pipeline make-toy toy/                 # the toy world (pipeline/toy.py)
    python -m pipeline check MANIFEST.jsonl ...      # every bad row with its line number and reason
    python -m pipeline bench MANIFEST.jsonl          # decode speed per worker, where the time goes
    python -m pipeline bench --clip720p --precut     # a generated 720p video at the paper's shape, then pre-cut
    python -m pipeline precut MANIFEST.jsonl OUT_DIR # decode once: small files the loader reads cheaply
    python -m pipeline tokenize MANIFEST.jsonl       # offline VQ targets beside the manifest (pipeline/targets.py)
    torchrun --nproc_per_node=8 -m pipeline tokenize MANIFEST.jsonl --preset paper   # every GPU its share
"""
import argparse
import atexit
import collections
import dataclasses
import os
import shutil
import sys
import tempfile
import time

import torch

from data import PAPER_DATA, TOY_DATA
from icode import preset, pretrained_targets
from pipeline.decode_bench import MEASURED_STEP, bench, cores_needed, make_bench_clip
from pipeline.index import ManifestRows
from pipeline.manifest import ManifestDataset, row_modalities
from pipeline.target_cache import targets_dir
from pipeline.media import BadExample, reason_kind
from pipeline.precut import precut_manifest
from pipeline.targets import checkpoint_target_tokenizers, target_quantize, tokenize_manifest
from pipeline.text import load_tokenizer, train_tokenizer
from pipeline.toy import TOY_SIZES, make_toy
from training.checkpoint import check_preset


def check_manifest(path, cfg, tokenizer=None, log=print):
    """Read every row; log `path:line: reason` for each bad one and a summary. Returns (rows, bad rows)."""
    try:
        ds = ManifestDataset(path, cfg, tokenizer, use_targets=False)
    except (OSError, ValueError) as e:
        log(f"{path}: cannot read the manifest: {e}")
        try:
            rows = list(ManifestRows(path)) if os.path.isfile(path) else []
        except (OSError, ValueError):  # unreadable as a whole (permissions): the message above says why
            rows = []
        for line, row in rows:  # why no row could decide the modalities
            if isinstance(row, str):
                log(f"{path}:{line}: {row}")
            elif not row_modalities(row):
                log(f"{path}:{line}: no media or text field ({sorted(row)})")
        return len(rows), max(1, len(rows))
    kinds = collections.Counter()
    for i in range(len(ds)):
        try:
            ds[i]
        except BadExample as e:
            kinds[reason_kind(e.reason)] += 1
            log(f"{ds.path}:{ds.line(i)}: {e.reason}")
    bad = sum(kinds.values())
    log(f"{ds.path}: {len(ds)} rows, {bad} bad ({bad / max(1, len(ds)):.1%}), modalities {'+'.join(ds.modalities)}"
        + (f"; {dict(kinds.most_common())}" if bad else ""))
    return len(ds), bad


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="i-Code data: toy world, manifest checks, decode benchmark, VQ cache.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("make-toy", help="write the toy world (videos, images, speech, manifests, tokenizer.json)")
    p.add_argument("out_dir", help="folder to write into")
    p.add_argument("--seed", type=int, default=0, help="everything written is a function of the seed and size")
    p.add_argument("--size", default="default", choices=sorted(TOY_SIZES), help="rows per source (see TOY_SIZES)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: the cores, at most 8)")
    p = sub.add_parser("check", help="read every row of manifests; report each bad one with its line and reason")
    p.add_argument("manifests", nargs="+", help="JSON Lines manifests")
    p.add_argument("--preset", default="toy", choices=["toy", "paper"], help="decode at this DataConfig")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: beside the manifest, if any)")
    p = sub.add_parser("bench", help="examples/s per core and where the time goes")
    p.add_argument("manifest", nargs="?", help="manifest to read (omit with --clip360p / --clip720p)")
    p.add_argument("--clip360p", action="store_true", help="generate a 360p H.264 8 s clip and bench the paper preset")
    p.add_argument("--clip720p", action="store_true",
                   help="generate a 30 s 720p H.264 video (a keyframe every 5 s) and bench a 7.8 s clip of it")
    p.add_argument("--precut", action="store_true", help="also bench the manifest after `precut` (a temporary copy)")
    p.add_argument("--preset", default=None, choices=["toy", "paper"], help="default: toy, paper with a --clip")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: beside the manifest; a --clip trains one)")
    p.add_argument("-n", type=int, default=64, help="examples to decode")
    p = sub.add_parser("precut", help="decode each row once at the clip shape; write small files and a new manifest")
    p.add_argument("manifest", help="JSON Lines manifest")
    p.add_argument("out_dir", help="folder for the pre-cut files and the new manifest (same file name)")
    p.add_argument("--preset", default="toy", choices=["toy", "paper"], help="the clip shape (DataConfig)")
    p.add_argument("--workers", type=int, default=1, help="processes")
    p = sub.add_parser("tokenize", help="write VQ target ids beside a manifest (<name>.targets/)")
    p.add_argument("manifests", nargs="+", help="JSON Lines manifests")
    p.add_argument("--preset", default="toy", choices=["toy", "paper"],
                   help="the data and model presets the targets are for (toy: train.py's tiny model)")
    p.add_argument("--batch-size", type=int, default=16, help="examples per quantizer call")
    p.add_argument("--video-tokenizer", default=None, help="a pretrained VQGAN folder (as train.py's flag)")
    p.add_argument("--speech-tokenizer", default=None, help="a Wav2Vec2ForPreTraining folder (as train.py's flag)")
    p.add_argument("--ckpt", default=None,
                   help="the target tokenizers of this train.py checkpoint (e.g. a run's --init) instead")
    args = ap.parse_args(argv)
    if args.cmd == "bench" and (args.manifest is None) == (not (args.clip360p or args.clip720p)):
        ap.error("bench needs a manifest, or --clip360p or --clip720p (one of them)")
    if args.cmd == "tokenize" and args.ckpt and (args.video_tokenizer or args.speech_tokenizer):
        ap.error("--ckpt brings its own target tokenizers: drop --video-tokenizer / --speech-tokenizer")
    return args


def _preset(name):
    return {"paper": PAPER_DATA, "toy": TOY_DATA}[name]


def _find_tokenizer(arg, manifest):
    p = arg or os.path.join(os.path.dirname(os.path.abspath(manifest)), "tokenizer.json")
    return load_tokenizer(p) if os.path.exists(p) else None


def run_make_toy(args):
    t = time.perf_counter()
    m = make_toy(args.out_dir, args.seed, args.size, args.workers)
    print(f"wrote the toy world ({args.size}, seed {args.seed}) to {args.out_dir} in {time.perf_counter() - t:.1f} s: "
          + ", ".join(f"{k} {sum(1 for _ in open(v))}" for k, v in m.items()))
    return 0


def run_check(args):
    bad = 0
    for m in args.manifests:
        bad += check_manifest(m, _preset(args.preset), _find_tokenizer(args.tokenizer, m))[1]
    print(f"{len(args.manifests)} manifest(s), {bad} bad row(s)")
    return 1 if bad else 0


def run_bench(args):
    """Examples/s on one core, and what the GPU step measured in docs/speed.md needs at that rate."""
    clip = "360p" if args.clip360p else "720p" if args.clip720p else None
    folder = tempfile.mkdtemp(prefix="icode_bench_")
    atexit.register(shutil.rmtree, folder, True)
    if clip:
        args.manifest = make_bench_clip(folder, clip)
        tok = _find_tokenizer(args.tokenizer, args.manifest) or train_tokenizer(
            ["a moving gradient with noise", "colourful stripes"], os.path.join(folder, "tokenizer.json"), 100)
    else:
        tok = _find_tokenizer(args.tokenizer, args.manifest)
    cfg = _preset(args.preset or ("paper" if clip else "toy"))
    manifests = [args.manifest]
    if args.precut:
        manifests.append(precut_manifest(args.manifest, os.path.join(folder, "precut"), cfg))
    step = MEASURED_STEP
    for m in manifests:
        rate, _ = bench(m, cfg, tok, n=args.n)
        if rate == 0:
            print(f"{m}: no good row decoded (`python -m pipeline check` says why)", file=sys.stderr)
            return 1
        print(f"the {step['card']} step of docs/speed.md ({step['samples_per_s']} samples/s) needs "
              f"{cores_needed(rate)} cores decoding at this rate; its machine has {step['cores']}")
    return 0


def run_precut(args):
    precut_manifest(args.manifest, args.out_dir, _preset(args.preset), args.workers)
    return 0


def run_tokenize(args):
    """Under torchrun every rank writes its share of each manifest's shards (on its GPU when there is one)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    barrier = None
    if world > 1:
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group("gloo")
        barrier = dist.barrier
    device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    cfg = _preset(args.preset)
    model = {"toy": "tiny", "paper": "paper"}[args.preset]     # the model preset trained on that data
    if args.ckpt:
        check_preset(args.ckpt, model)
        model_cfg, toks = checkpoint_target_tokenizers(args.ckpt)
        q = target_quantize(model_cfg, f"{model} model of {args.ckpt}", toks, device)
    else:
        fields, toks = pretrained_targets(args.video_tokenizer, args.speech_tokenizer)
        q = target_quantize(dataclasses.replace(preset(model), **fields), model, toks, device)
    for m in args.manifests:
        written, bad = tokenize_manifest(m, cfg, q, args.batch_size, name=q.__name__, rank=rank, world=world,
                                         barrier=barrier)
        print(f"{m}: rank {rank} of {world} wrote the ids of {written} rows to {targets_dir(m)} ({bad} bad rows "
              f"skipped; rows already there kept)")
    if barrier is not None:
        barrier()
        dist.destroy_process_group()
    return 0


def main(argv=None):
    args = parse_args(argv)
    return {"make-toy": run_make_toy, "check": run_check, "bench": run_bench, "precut": run_precut,
            "tokenize": run_tokenize}[args.cmd](args)
