"""The data commands (`python -m pipeline COMMAND`): make the toy world, check manifests, time decoding, write
offline VQ targets.

    python -m pipeline make-toy toy/                 # the toy world (pipeline/toy.py)
    python -m pipeline check MANIFEST.jsonl ...      # every bad row with its line number and reason
    python -m pipeline bench MANIFEST.jsonl          # decode speed per worker, where the time goes
    python -m pipeline bench --clip360p              # the same on a generated 360p clip at the paper's shape
    python -m pipeline tokenize MANIFEST.jsonl       # offline VQ targets beside the manifest (pipeline/targets.py)
"""
import argparse
import atexit
import collections
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time

import av
import numpy as np
import torch

from data import PAPER_DATA, TOY_DATA, collate
from icode import preset, pretrained_targets
from pipeline.manifest import ManifestDataset, read_manifest, row_modalities, targets_dir
from pipeline.media import BadExample, reason_kind
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
            rows = read_manifest(path) if os.path.isfile(path) else []
        except (OSError, ValueError):  # unreadable as a whole (permissions, not UTF-8): the message above says why
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


def make_bench_clip(out_dir, seconds=8.0, width=640, height=360, fps=30, sr=48000):
    """A 360p H.264 clip with 48 kHz stereo AAC audio and a one-row manifest: the paper preset's clip shape."""
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(0)
    n = int(seconds * fps)
    yy, xx = np.mgrid[0:height, 0:width]
    frames = np.empty((n, height, width, 3), np.uint8)
    for f in range(n):  # moving gradients and noise: H.264 has real work to do
        frames[f, ..., 0] = (xx + 4 * f) % 256
        frames[f, ..., 1] = (yy + 2 * f) % 256
        frames[f, ..., 2] = rng.integers(0, 64, (height, width))
    audio = (0.1 * rng.standard_normal((2, int(seconds * sr)))).astype(np.float32)
    path = os.path.join(out_dir, "clip360p.mp4")
    with av.open(path, "w", format="mp4") as c:  # encoded as a phone or YouTube would: medium preset, 2 s GOP
        vs = c.add_stream("libx264", rate=fps, options={"preset": "veryfast", "g": str(2 * fps)})
        vs.width, vs.height, vs.pix_fmt = width, height, "yuv420p"
        st = c.add_stream("aac", rate=sr, layout="stereo", options={"aac_coder": "fast"})
        for img in frames:
            for p in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)
        a = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio.T.reshape(1, -1)), format="flt", layout="stereo")
        a.sample_rate, a.pts = sr, 0
        for p in st.encode(a) + st.encode(None):
            c.mux(p)
    manifest = os.path.join(out_dir, "bench360p.jsonl")
    with open(manifest, "w") as f:
        f.write(json.dumps({"video": "clip360p.mp4", "start": 0.1, "end": 7.9,
                            "text": "a moving gradient with noise", "caption": "colourful stripes"}) + "\n")
    return manifest


def bench(path, cfg, tokenizer, n=64, batch_size=8, log=print):
    """Decode `n` examples in this process (one worker, one torch thread) and collate them; log examples/s
    per worker and the seconds per example spent in video decode, audio decode, text and collate."""
    torch.set_num_threads(1)
    ds = ManifestDataset(path, cfg, tokenizer, use_targets=False)
    timing, done, bad, buf = collections.Counter(), 0, 0, []
    g = torch.Generator().manual_seed(0)
    for i in range(len(ds)):  # warm-up on the first good row: imports, codec tables
        try:
            ds[i]
            break
        except BadExample:
            continue
    t0 = time.perf_counter()
    for i in range(n):
        try:
            e = ds[i % len(ds)]
        except BadExample:
            bad += 1
            continue
        timing.update(e["timing"])
        buf.append(e)
        done += 1
        if len(buf) == batch_size:
            t = time.perf_counter()
            collate(buf, cfg, tokenizer, g)
            timing["collate"] += time.perf_counter() - t
            buf = []
    total = time.perf_counter() - t0
    rate = done / total
    log(f"{ds.path}: {done} examples ({bad} bad) in {total:.2f} s: {rate:.1f} examples/s per worker; per example "
        + ", ".join(f"{k} {1000 * v / max(1, done):.1f} ms" for k, v in sorted(timing.items())))
    return rate, {k: v / max(1, done) for k, v in timing.items()}


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
    p = sub.add_parser("bench", help="examples/s per worker and where the time goes")
    p.add_argument("manifest", nargs="?", help="manifest to read (omit with --clip360p)")
    p.add_argument("--clip360p", action="store_true", help="generate a 360p H.264 8 s clip and bench the paper preset")
    p.add_argument("--preset", default=None, choices=["toy", "paper"], help="default: toy, paper with --clip360p")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: beside the manifest; --clip360p trains one)")
    p.add_argument("-n", type=int, default=64, help="examples to decode")
    p.add_argument("--step-batch", type=int, default=24, help="per-GPU batch of a training step (paper preset: 24)")
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
    if args.cmd == "bench" and args.manifest is None and not args.clip360p:
        ap.error("bench needs a manifest or --clip360p")
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
    if args.clip360p:
        folder = tempfile.mkdtemp(prefix="icode_bench_")
        atexit.register(shutil.rmtree, folder, True)
        args.manifest = make_bench_clip(folder)
        tok = _find_tokenizer(args.tokenizer, args.manifest) or train_tokenizer(
            ["a moving gradient with noise", "colourful stripes"], os.path.join(folder, "tokenizer.json"), 100)
    else:
        tok = _find_tokenizer(args.tokenizer, args.manifest)
    cfg = _preset(args.preset or ("paper" if args.clip360p else "toy"))
    rate, _ = bench(args.manifest, cfg, tok, n=args.n)
    if rate == 0:
        print(f"{args.manifest}: no good row decoded (`python -m pipeline check` says why)", file=sys.stderr)
        return 1
    for step_s in (0.25, 0.5):
        need = args.step_batch / step_s
        print(f"a GPU step of batch {args.step_batch} every {step_s} s needs {need:.0f} examples/s: "
              f"{math.ceil(need / rate)} workers (cores) at this rate")
    return 0


def run_tokenize(args):
    cfg = _preset(args.preset)
    model = {"toy": "tiny", "paper": "paper"}[args.preset]     # the model preset trained on that data
    if args.ckpt:
        check_preset(args.ckpt, model)
        model_cfg, toks = checkpoint_target_tokenizers(args.ckpt)
        q = target_quantize(model_cfg, f"{model} model of {args.ckpt}", toks)
    else:
        fields, toks = pretrained_targets(args.video_tokenizer, args.speech_tokenizer)
        q = target_quantize(dataclasses.replace(preset(model), **fields), model, toks)
    for m in args.manifests:
        written, bad = tokenize_manifest(m, cfg, q, args.batch_size, name=q.__name__)
        print(f"{m}: wrote {written} target files to {targets_dir(m)} ({bad} bad rows skipped)")
    return 0


def main(argv=None):
    args = parse_args(argv)
    return {"make-toy": run_make_toy, "check": run_check, "bench": run_bench, "tokenize": run_tokenize}[args.cmd](args)
