"""An offline pass that decodes each row of a manifest once, at the run's clip shape, and writes what the loader
then reads cheaply (`python -m pipeline precut M.jsonl OUT_DIR`): for a video row, a short MP4 holding just the
T frames the loader samples, already turned upright, resized and cropped (one keyframe, so nothing is decoded
that is not used), and a 16 kHz mono WAV of its sound; for an image row, the cropped image as a JPEG. Text,
captions and labels are kept. The rows of OUT_DIR/<name>.jsonl read back as the same examples (the frames
through one more H.264 encoding at a high quality, `CRF`; the sound exactly), at a fraction of the decoding
cost (README, "Data loading"). Bad rows are left out, with their line numbers and reasons on stderr.
"""
import json
import multiprocessing
import os
import sys

import numpy as np
import soundfile

from pipeline.manifest import ManifestDataset
from pipeline.media import BadExample, write_jpeg, write_mp4

CRF = 12                 # H.264 quality of the pre-cut frames (18 is "visually lossless"; lower: closer still)
KEEP = ("text", "caption", "id", "score", "emotions", "label", "question", "answers", "answer")


def _precut_row(args):
    """(manifest, cfg, out_dir, i) -> (row index, new row or None, reason or None). Runs in a worker process."""
    path, cfg, out_dir, i = args
    ds = _dataset(path, cfg)
    row = ds.row(i)
    try:
        ex = ds[i]
    except BadExample as e:
        return i, None, f"{ds.path}:{ds.line(i)}: {e.reason}"
    new = {k: row[k] for k in KEEP if k in row}
    stem = os.path.join(out_dir, ds.name, f"{i:09d}")
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    if ex.get("static"):                            # an image: its cropped frame
        write_jpeg(stem + ".jpg", ex["video"][0])
        new["image"] = os.path.relpath(stem + ".jpg", out_dir)
    elif "video" in ex:                             # T frames at T frames a second: frame k is segment k's centre
        T = len(ex["video"])
        write_mp4(stem + ".mp4", ex["video"], fps=T, keyint=T, crf=CRF)
        new["video"] = os.path.relpath(stem + ".mp4", out_dir)
        if "audio" not in ex:
            new["mute"] = True
    if "audio" in ex:
        soundfile.write(stem + ".wav", ex["audio"], cfg.sample_rate, subtype="FLOAT")
        new["audio"] = os.path.relpath(stem + ".wav", out_dir)
    return i, new, None


_DATASETS = {}


def _dataset(path, cfg):
    """One ManifestDataset per worker process (the index is memory-mapped, nothing per row is held)."""
    key = (os.path.abspath(path), repr(cfg))
    if key not in _DATASETS:
        _DATASETS[key] = ManifestDataset(path, cfg, tokenizer=None, use_targets=False)
    return _DATASETS[key]


def precut_manifest(path, out_dir, cfg, workers=1, log=print):
    """Pre-cut every row of the manifest at `path` into `out_dir`; returns the new manifest's path."""
    n = len(_dataset(path, cfg))
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, os.path.basename(path))
    jobs = [(os.path.abspath(path), cfg, out_dir, i) for i in range(n)]
    bad = 0
    with open(out + ".tmp", "w") as f:
        pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None
        results = pool.imap(_precut_row, jobs, chunksize=16) if pool else map(_precut_row, jobs)
        for i, row, reason in results:
            if row is None:
                bad += 1
                print(f"precut: left out {reason}", file=sys.stderr)
            else:
                f.write(json.dumps(row) + "\n")
        if pool:
            pool.close()
            pool.join()
    os.replace(out + ".tmp", out)
    log(f"{path}: {n - bad} rows pre-cut to {out} ({bad} bad rows left out)")
    return out


def frames_difference(a, b):
    """Mean absolute difference of two uint8 frame stacks, in levels of 255 (how close the pre-cut frames are)."""
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())
