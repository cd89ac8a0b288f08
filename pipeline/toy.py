"""The toy world: small real media files with learnable cross-modal content (`python -m pipeline make-toy`, or
`python train.py` when `toy/` is missing).

A clip shows one coloured shape moving over a shaded background and a synthetic voice says words about
it. Every word is a deterministic "syllable" sequence (pitch, two formants, duration from the word's
hash), so the waveform carries the words' identity and a speech encoder can learn them. Colour, shape
and motion words are seen, heard and written consistently in the pretraining sources; the downstream
labels combine a colour seen only in the video, a mood word said only in the audio and a judgement
written only in the text, so they need all three modalities.
"""
import dataclasses
import hashlib
import json
import os

import numpy as np
import soundfile

from data import TOY_DATA
from pipeline.media import write_jpeg, write_mp4
from pipeline.text import train_tokenizer

TOY_COLOURS = {"red": (225, 45, 45), "purple": (150, 65, 200), "blue": (50, 90, 230),
               "orange": (245, 145, 30), "yellow": (235, 220, 50), "green": (50, 190, 70)}
TOY_SHAPES = ("circle", "square", "triangle", "cross")
TOY_MOTIONS = ("left", "right", "up", "down")
TOY_MOODS = ("angry", "disgusted", "sad", "scared", "surprised", "happy")          # said (downstream: audio only)
TOY_JUDGEMENTS = ("awful", "bad", "poor", "fine", "good", "great")                 # written (downstream: text only)
TOY_EMOTIONS = ("anger", "disgust", "sadness", "fear", "surprise", "happiness")    # the 6 classes (CMU-MOSEI's)
TOY_VALUES = (-1.0, -0.6, -0.2, 0.2, 0.6, 1.0)  # f(colour), g(mood), h(judgement): the value at the word's index
TOY_FILLERS = ("the", "a", "look", "now", "here", "this", "see", "so", "it", "one")
TOY_QUESTION = "what colour is the shape?"   # multiple choice: the answer is only in the frames
TOY_SIZES = {  # rows per pretraining source, held-out video clips, downstream train / validation / test
    "default": dict(pretrain=400, test=100, train=300, validation=100, downstream_test=100),
    "small": dict(pretrain=64, test=16, train=32, validation=16, downstream_test=16),
    "tiny": dict(pretrain=6, test=4, train=6, validation=3, downstream_test=3),
}
TOY_W, TOY_H, TOY_FPS, TOY_SECONDS = 80, 64, 10, 2.0  # 80x64 frames exercise the resize + centre crop
TOY_DIR = "toy"                    # where train.py and eval.py look for (and make) the toy world
TOY_OUT = os.path.join("runs", "toy")   # train.py's run folder on the toy world
TOY_ENCODERS = os.path.join("runs", "toy_encoders")   # its single-modality encoders (stage one)
TOY_DUAL = ("image_text.jsonl", "speech_text.jsonl", "video_speech.jsonl")   # "D": dual-modality sources
TOY_VIDEOS = ("video.jsonl",)                                                # "V": V+L+S videos (section 3)
TOY_PRETRAIN = TOY_VIDEOS + TOY_DUAL   # the four sources: `python train.py` pretrains on D+V
TOY_WEIGHTS = (3.0, 1.0, 1.0, 1.0)     # their mixing weights, chosen on the validation clips (README, Results)
TOY_HELDOUT = "video_test.jsonl"   # held-out V+L+S clips: zero-shot retrieval after pretraining
TOY_VALIDATION = "video_validation.jsonl"   # more held-out clips: recipes are chosen on these, never on the test


def _toy_syllables(word):
    """Deterministic (f0 Hz, F1 Hz, F2 Hz, seconds) for each of a word's 1-2 syllables, from its hash."""
    h = hashlib.sha256(word.encode()).digest()
    return [(95 + h[1 + 4 * j] % 90, 300 + h[2 + 4 * j] * 600 // 255, 1000 + h[3 + 4 * j] * 1400 // 255,
             0.11 + (h[4 + 4 * j] % 5) * 0.01) for j in range(1 + h[0] % 2)]


def _toy_syllable(f0, f1, f2, dur, sr):
    n = int(dur * sr)
    t = np.arange(n) / sr
    phase = 2 * np.pi * np.cumsum(f0 * (1 + 0.08 * (0.5 - t / dur))) / sr  # a slightly falling pitch
    k = np.arange(1, int(min(4000, sr / 2 - 200) // f0) + 1)[:, None]
    amp = np.exp(-((k * f0 - f1) / 120.0) ** 2) + 0.8 * np.exp(-((k * f0 - f2) / 180.0) ** 2) + 0.05 / k
    keep = amp[:, 0] > 0.03  # the harmonics near the formants (and the lowest few) carry the word
    wave = (amp[keep] * np.sin(k[keep] * phase)).sum(0) * np.sin(np.pi * t / dur) ** 0.5
    return wave / (np.abs(wave).max() + 1e-9)


def toy_speech(words, sr, rng, max_s):
    """Words -> (float32 waveform of max_s seconds, the words that fit). Speaker pitch and rate vary."""
    pitch, rate = rng.uniform(0.85, 1.15), rng.uniform(0.9, 1.1)
    out, kept = [np.zeros(int(rng.uniform(0.05, 0.15) * sr))], []
    for w in words:
        seg = [_toy_syllable(f0 * pitch, f1, f2, d / rate, sr) for f0, f1, f2, d in _toy_syllables(w)]
        seg.append(np.zeros(int(rng.uniform(0.04, 0.08) * sr)))
        if sum(map(len, out + seg)) > max_s * sr:
            break
        out += seg
        kept.append(w)
    x = np.concatenate(out) * 0.3
    x = np.pad(x, (0, int(max_s * sr) - len(x))) + rng.normal(0, 0.003, int(max_s * sr))
    return x.astype(np.float32), kept


def _toy_frames(rng, colour, shape, motion, n_frames):
    """uint8 [n_frames, TOY_H, TOY_W, 3]: a shape moving over a shaded background (still if n_frames == 1)."""
    base = rng.uniform(70, 150, 3)
    shade = np.linspace(-25, 25, TOY_H)[:, None, None] * rng.choice([-1, 1])
    bg = np.clip(base + shade + np.zeros((TOY_H, TOY_W, 3)), 0, 255)
    r = rng.uniform(14, 17)
    cx, cy, d = TOY_W / 2 + rng.uniform(-3, 3), TOY_H / 2 + rng.uniform(-3, 3), rng.uniform(8, 10)
    dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[motion]
    yy, xx = np.mgrid[0:TOY_H, 0:TOY_W].astype(np.float64)
    out = []
    for f in range(n_frames):
        p = f / (n_frames - 1) - 0.5 if n_frames > 1 else 0.0
        u, v = xx - (cx + 2 * d * p * dx), yy - (cy + 2 * d * p * dy)
        m = {"circle": u * u + v * v <= r * r,
             "square": (np.abs(u) <= 0.85 * r) & (np.abs(v) <= 0.85 * r),
             "triangle": (v <= r * 0.8) & (v >= -r) & (np.abs(u) <= (v + r) * 0.55),
             "cross": ((np.abs(u) <= r / 3) & (np.abs(v) <= r)) | ((np.abs(v) <= r / 3) & (np.abs(u) <= r))}[shape]
        img = bg.copy()
        img[m] = TOY_COLOURS[colour]
        out.append(img.astype(np.uint8))
    return np.stack(out)



def _toy_item(args):
    """One toy row: (kind, index, seed, out_dir) -> manifest dict (files written under out_dir/kind/)."""
    kind, i, seed, out = args
    rng = np.random.default_rng([seed, ["video", "image_text", "speech_text", "video_speech", "video_test",
                                        "downstream_train", "downstream_validation", "downstream_test",
                                        "video_validation"].index(kind), i])
    colour = str(rng.choice(list(TOY_COLOURS)))
    shape, motion = str(rng.choice(TOY_SHAPES)), str(rng.choice(TOY_MOTIONS))
    folder = os.path.join(out, kind)
    n_frames = int(TOY_SECONDS * TOY_FPS)
    stereo48 = i % 4 == 3  # some clips carry 48 kHz stereo audio, some are stored rotated: decoding must cope
    sr = 48000 if stereo48 else 16000

    def video_file(words):
        wave, kept = toy_speech(words, sr, rng, TOY_SECONDS)
        audio = np.stack([wave, wave]) if stereo48 else wave[None]
        frames = _toy_frames(rng, colour, shape, motion, n_frames)
        rotation = 90 if i % 10 == 7 else 0
        if rotation:  # store the frames turned clockwise; the display matrix turns them back
            frames = np.rot90(frames, k=-1, axes=(1, 2))
        name = f"{i:06d}.mp4"
        write_mp4(os.path.join(folder, name), frames, TOY_FPS, audio, sr, rotation)
        return f"{kind}/{name}", " ".join(kept)

    filler = [str(rng.choice(TOY_FILLERS))]
    extra = [str(rng.choice(TOY_MOODS + TOY_JUDGEMENTS + TOY_FILLERS))]
    if kind in ("video", "video_test", "video_validation"):  # V+L+S: ASR transcript, plus a caption of the visuals
        words = filler + [colour, shape, "moving", motion] + extra
        path, said = video_file(words)
        return {"video": path, "text": said, "caption": f"a {colour} {shape} moving {motion}"}
    if kind == "video_speech":  # V+S: a spoken caption, no text (SMiT-like)
        path, _ = video_file([colour, shape, "moving", motion] + filler)
        return {"video": path}
    if kind == "image_text":  # V+L: a still shape and its caption
        name = f"{i:06d}.jpg"
        write_jpeg(os.path.join(folder, name), _toy_frames(rng, colour, shape, motion, 1)[0])
        prefix = str(rng.choice(["", "look at", "here is", "this is", "a picture of"]))
        return {"image": f"{kind}/{name}", "text": f"{prefix} a {colour} {shape}".strip()}
    if kind == "speech_text":  # S+L: transcribed speech in varied formats and rates
        vocab = list(TOY_COLOURS) + list(TOY_SHAPES + TOY_MOTIONS + TOY_MOODS + TOY_JUDGEMENTS)
        words = [str(w) for w in rng.choice(vocab, int(rng.integers(3, 6)))]
        fmt, rate, ch = [("flac", 44100, 2), ("wav", 8000, 1), ("wav", 16000, 1), ("wav", 16000, 1)][i % 4]
        wave, kept = toy_speech(words, rate, rng, TOY_SECONDS)
        name = f"{i:06d}.{fmt}"
        soundfile.write(os.path.join(folder, name), np.stack([wave] * ch, 1), rate, format=fmt.upper(),
                        subtype="PCM_16")
        return {"audio": f"{kind}/{name}", "text": " ".join(kept)}
    # downstream: colour only seen, mood only said, judgement only written
    mood, judgement = int(rng.integers(6)), int(rng.integers(6))
    path, said = video_file([shape, "feels", TOY_MOODS[mood]])
    c = list(TOY_COLOURS).index(colour)
    score = TOY_VALUES[c] + TOY_VALUES[mood] + TOY_VALUES[judgement]
    emotions = [int(k in (mood, c, judgement)) for k in range(6)]   # one class from each modality
    answers = [colour] + [str(w) for w in rng.choice([w for w in TOY_COLOURS if w != colour], 3, replace=False)]
    order = rng.permutation(4)
    return {"video": path, "text": f"the {shape} looks {TOY_JUDGEMENTS[judgement]}", "score": round(score, 2),
            "emotions": emotions, "label": int(score > 0), "question": TOY_QUESTION,
            "answers": [answers[k] for k in order], "answer": int(np.argmin(order))}


def make_toy(out_dir, seed=0, size="default", workers=None):
    """Write the toy world under out_dir (deterministic in seed and size); returns {manifest name: path}.

    Files: video.jsonl (V+L+S), image_text.jsonl (V+L), speech_text.jsonl (S+L), video_speech.jsonl
    (V+S), video_test.jsonl (held-out V+L+S clips for retrieval), downstream_{train,validation,test}.jsonl
    (V+L+S with score / emotions / label / question / answers / answer), tokenizer.json, toy_world.json.
    """
    n = TOY_SIZES[size] if isinstance(size, str) else size
    os.makedirs(out_dir, exist_ok=True)
    plan = [("video", "video", n["pretrain"]), ("image_text", "image_text", n["pretrain"]),
            ("speech_text", "speech_text", n["pretrain"]), ("video_speech", "video_speech", n["pretrain"]),
            ("video_test", "video_test", n["test"]), ("video_validation", "video_validation", n["test"]),
            ("downstream_train", "downstream_train", n["train"]),
            ("downstream_validation", "downstream_validation", n["validation"]),
            ("downstream_test", "downstream_test", n["downstream_test"])]
    jobs = []
    for _, kind, count in plan:
        os.makedirs(os.path.join(out_dir, kind), exist_ok=True)
        jobs += [(kind, i, seed, out_dir) for i in range(count)]
    workers = workers or min(os.cpu_count() or 1, 8)
    if workers > 1 and len(jobs) > 50:
        import multiprocessing
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            rows = pool.map(_toy_item, jobs, chunksize=8)
    else:
        rows = [_toy_item(j) for j in jobs]
    manifests, k, texts = {}, 0, []
    for name, kind, count in plan:
        manifests[name] = os.path.join(out_dir, f"{name}.jsonl")
        with open(manifests[name], "w") as f:
            for row in rows[k:k + count]:
                f.write(json.dumps(row) + "\n")
                texts += [row[key] for key in ("text", "caption", "question") if key in row] + row.get("answers", [])
        k += count
    vocab = list(TOY_COLOURS) + list(TOY_SHAPES + TOY_MOTIONS + TOY_MOODS + TOY_JUDGEMENTS + TOY_FILLERS)
    train_tokenizer(texts + vocab + ["moving feels looks"], os.path.join(out_dir, "tokenizer.json"), vocab_size=200)
    with open(os.path.join(out_dir, "toy_world.json"), "w") as f:
        json.dump({"seed": seed, "size": n, "colours": TOY_COLOURS, "shapes": TOY_SHAPES, "motions": TOY_MOTIONS,
                   "moods": TOY_MOODS, "judgements": TOY_JUDGEMENTS, "emotions": TOY_EMOTIONS, "values": TOY_VALUES,
                   "score": "values[colour] + values[mood] + values[judgement]; colour only seen, mood only said, "
                            "judgement only written",
                   "emotions_rule": "the classes of the mood, the colour and the judgement indices",
                   "question": "the colour of the shape, among 4 colours: only the frames hold the answer",
                   "label": "score > 0", "config": dataclasses.asdict(TOY_DATA)}, f, indent=1)
    return manifests
