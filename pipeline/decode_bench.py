"""How fast one CPU core turns manifest rows into examples (`python -m pipeline bench`), on a manifest or on a
generated clip of the paper's shape, and how many cores the measured GPU step needs at that rate.

    --clip360p   an 8 s 640x360 H.264 clip (2 s between keyframes), the whole clip
    --clip720p   a 30 s 1280x720 H.264 video with a keyframe every 5 s (as video sites serve them), the paper's
                 7.8 s clip cut from its middle: seeking lands up to 5 s before the first frame wanted
"""
import collections
import json
import os
import time

import av
import numpy as np
import torch

from data import collate
from pipeline.manifest import ManifestDataset
from pipeline.media import BadExample

# The GPU step measured in docs/speed.md: one H100, batch 24, --compile --compile-mode reduce-overhead.
MEASURED_STEP = {"samples_per_s": 91.33, "card": "H100", "cores": 16}
BENCH_CLIPS = {  # name: (seconds, width, height, fps, seconds between keyframes, clip start, clip end)
    "360p": (8.0, 640, 360, 30, 2.0, 0.1, 7.9),
    "720p": (30.0, 1280, 720, 30, 5.0, 12.0, 19.8),
}


def make_bench_clip(out_dir, kind="360p", sr=48000):
    """A generated H.264 video with 48 kHz stereo AAC (moving gradients and noise: the encoder has real work to
    do) and a one-row manifest cutting the clip of BENCH_CLIPS[kind] out of it; returns the manifest's path."""
    seconds, width, height, fps, keyint_s, start, end = BENCH_CLIPS[kind]
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width]
    path = os.path.join(out_dir, f"clip{kind}.mp4")
    with av.open(path, "w", format="mp4") as c:
        vs = c.add_stream("libx264", rate=fps, options={"preset": "veryfast", "g": str(int(keyint_s * fps))})
        vs.width, vs.height, vs.pix_fmt = width, height, "yuv420p"
        st = c.add_stream("aac", rate=sr, layout="stereo", options={"aac_coder": "fast"})
        img = np.empty((height, width, 3), np.uint8)
        for f in range(int(seconds * fps)):
            img[..., 0] = (xx + 4 * f) % 256
            img[..., 1] = (yy + 2 * f) % 256
            img[..., 2] = rng.integers(0, 64, (height, width))
            for p in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)
        audio = (0.1 * rng.standard_normal((2, int(seconds * sr)))).astype(np.float32)
        a = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio.T.reshape(1, -1)), format="flt", layout="stereo")
        a.sample_rate, a.pts = sr, 0
        for p in st.encode(a) + st.encode(None):
            c.mux(p)
    manifest = os.path.join(out_dir, f"bench{kind}.jsonl")
    with open(manifest, "w") as f:
        f.write(json.dumps({"video": os.path.basename(path), "start": start, "end": end,
                            "text": "a moving gradient with noise", "caption": "colourful stripes"}) + "\n")
    return manifest


def bench(path, cfg, tokenizer, n=64, batch_size=8, log=print):
    """Decode `n` examples in this process (one core: one worker, one torch thread) and collate them; log
    examples/s per core and the seconds per example spent in video decode, audio decode, text and collate."""
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
    log(f"{ds.path}: {done} examples ({bad} bad) in {total:.2f} s: {rate:.1f} examples/s per core; per example "
        + ", ".join(f"{k} {1000 * v / max(1, done):.1f} ms" for k, v in sorted(timing.items())))
    return rate, {k: v / max(1, done) for k, v in timing.items()}


def cores_needed(rate, samples_per_s=MEASURED_STEP["samples_per_s"]):
    """Decoding cores a GPU step consuming `samples_per_s` examples a second needs at `rate` examples/s a core."""
    return int(np.ceil(samples_per_s / rate))
