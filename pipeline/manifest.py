"""JSON Lines manifests to examples (paper section 3: three-modality video clips and dual-modality pairs).

One manifest per dataset, one example per line, paths relative to the manifest's folder (README "Manifests"):
  video    a container (MP4, MKV, WebM...) read through PyAV; its audio stream is the speech input
           unless the row has its own `audio` or sets "mute": true
  start, end  seconds into `video` (and `audio`) cutting a clip out of a long file (optional)
  image    a still image (JPEG, PNG...), read through PyAV as a static clip of `frames` frames
  audio    a separate audio file: WAV/FLAC through soundfile, anything else through PyAV
  text     transcript or caption; caption  an extra caption (videos: section 4.2.2 joins both)
  mute     true: ignore the video's audio stream (video-caption pairs without speech)
  id       free-form identifier, ignored
  score, emotions, label, question, answers, answer   downstream labels, passed through
The first valid row decides the manifest's modalities; every row must provide them.

`ManifestDataset(path, cfg, tokenizer)[i]` decodes row i into an example (dicts of numpy arrays and lists) or
raises `BadExample`; the offline VQ targets of `python -m pipeline tokenize` are read here too.
"""
import math
import os
import sys
import time

import torch

from model.fusion import MODALITIES
from pipeline.index import ManifestRows
from pipeline.media import BadExample, read_audio, read_image, read_video
from pipeline.target_cache import TargetCache

MEDIA_FIELDS = ("video", "image", "audio", "text", "caption", "start", "end", "mute", "id")
LABEL_FIELDS = ("score", "emotions", "label", "question", "answers", "answer")
KNOWN_FIELDS = frozenset(MEDIA_FIELDS + LABEL_FIELDS)


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_labels(row, emotions_len=None):
    """Raise BadExample unless the row's downstream labels have the types the collator and eval.py need:
    score a number, emotions a list of numbers (`emotions_len` long: the first row's), label a number or a
    boolean, question a string, answers a non-empty list of strings, answer an index into answers."""
    if "score" in row and not _is_number(row["score"]):
        raise BadExample(f"score must be a number, got {row['score']!r}")
    if "label" in row and not (_is_number(row["label"]) or isinstance(row["label"], bool)):
        raise BadExample(f"label must be a number or a boolean, got {row['label']!r}")
    if "emotions" in row:
        e = row["emotions"]
        if not isinstance(e, list) or not e or not all(_is_number(x) for x in e):
            raise BadExample(f"emotions must be a non-empty list of numbers, got {e!r}")
        if emotions_len is not None and len(e) != emotions_len:
            raise BadExample(f"emotions has {len(e)} entries, the manifest's first row {emotions_len}")
    if "question" in row and not isinstance(row["question"], str):
        raise BadExample(f"question must be a string, got {row['question']!r}")
    answers = row.get("answers")
    n = len(answers) if isinstance(answers, list) else None
    if "answers" in row and (not n or not all(isinstance(a, str) for a in answers)):
        raise BadExample(f"answers must be a non-empty list of strings, got {answers!r}")
    if "answer" in row:
        a = row["answer"]
        if not isinstance(a, int) or isinstance(a, bool) or a < 0 or (n is not None and a >= n):
            raise BadExample(f"answer must be an index into answers ({n if n is not None else 'none'} given), got {a!r}")


def row_modalities(row):
    """The modalities a manifest row provides, in MODALITIES order."""
    has = {"video": "video" in row or "image" in row,
           "text": "text" in row or "caption" in row,
           "audio": "audio" in row or ("video" in row and row.get("mute", False) is not True)}
    return tuple(m for m in MODALITIES if has[m])


class ManifestDataset(torch.utils.data.Dataset):
    """One JSON Lines manifest -> examples (dicts of numpy arrays and lists); a bad row raises BadExample.

    An example holds "source", "line", "modalities", and per modality
      "video" uint8 [T, H, W, 3] (images: the same frame T times, and "static": True), "audio" float32 [N]
      at 16 kHz mono,
      "text_ids" list of ids ([CLS] ... [SEP]; videos join caption and transcript, section 4.2.2),
    the downstream label fields present in the row, "video_targets"/"audio_targets" when the manifest
    has an offline VQ-target cache written for this DataConfig ("stale_targets": True instead when the row
    changed since its ids were written: the loader says so once per manifest), and "timing" (seconds per stage).
    Rows are read on demand through the manifest's line index (pipeline/index.py): nothing per row is held.
    """

    def __init__(self, path, cfg, tokenizer=None, *, use_targets=True):
        self.path = os.path.abspath(path)
        self.root = os.path.dirname(self.path)
        self.name = os.path.splitext(os.path.basename(path))[0]
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.rows = ManifestRows(self.path)
        first = next((r for _, r in self.rows if isinstance(r, dict) and row_modalities(r)), None)
        if first is None:
            raise ValueError(f"{self.path}: no valid row to decide the modalities from ({len(self.rows)} rows)")
        self.modalities = row_modalities(first)
        e = first.get("emotions")
        self.emotions_len = len(e) if isinstance(e, list) else None
        self.targets = TargetCache.open(self.path, cfg) if use_targets else None   # offline VQ targets, if any

    def __len__(self):
        return len(self.rows)

    def line(self, i):
        """Row i's line number in the manifest (from 1)."""
        return self.rows.line(i)

    def row(self, i):
        """Row i as a dict, or the reason it is not one (a string)."""
        return self.rows.row(i)

    def _file(self, rel):
        if not isinstance(rel, str) or not rel:
            raise BadExample(f"path must be a non-empty string, got {rel!r}")
        return rel if os.path.isabs(rel) else os.path.join(self.root, rel)

    def __getitem__(self, i):
        row = self.rows.row(i)
        if isinstance(row, str):
            raise BadExample(row)
        try:
            return self._example(i, row)
        except BadExample:
            raise
        except Exception as e:  # a decoder surprise must not stop training: report it with its type
            raise BadExample(f"undecodable ({type(e).__name__}: {e})") from e

    def _example(self, i, row):
        cfg = self.cfg
        unknown = sorted(set(row) - KNOWN_FIELDS)
        if unknown:
            raise BadExample(f"unknown field(s) {unknown}; known: {sorted(KNOWN_FIELDS)}")
        if not isinstance(row.get("mute", False), bool):  # "false" (a string) would otherwise mute the row
            raise BadExample(f"mute must be true or false, got {row['mute']!r}")
        missing = [m for m in self.modalities if m not in row_modalities(row)]
        if missing:
            raise BadExample(f"row lacks {missing} that the manifest's first row provides ({list(self.modalities)})")
        start, end = row.get("start"), row.get("end")
        for k, v in (("start", start), ("end", end)):
            if v is not None and not (_is_number(v) and v >= 0):
                raise BadExample(f"{k} must be a non-negative number of seconds, got {v!r}")
        if start is not None and end is not None and end <= start:
            raise BadExample(f"end ({end}) must be after start ({start})")
        check_labels(row, self.emotions_len)
        ex = {"source": self.name, "line": self.rows.line(i), "modalities": self.modalities}
        timing = {}
        if "text" in self.modalities:
            t = time.perf_counter()
            parts = [row[k] for k in ("caption", "text") if k in row]  # caption first: truncation cuts the transcript
            if not all(isinstance(p, str) for p in parts):
                raise BadExample(f"text and caption must be strings, got {[type(p).__name__ for p in parts]}")
            parts = [p.strip() for p in parts if p.strip()]
            if not parts:
                raise BadExample("empty text")
            ex["text"] = " ".join(parts)
            if self.tokenizer is not None:
                ids = self.tokenizer.encode_one(*parts[:2], max_len=cfg.max_text_len)
                if not [x for x in ids if x not in self.tokenizer.special_ids]:
                    raise BadExample(f"text has no tokens: {ex['text'][:60]!r}")
                ex["text_ids"] = ids
            timing["text"] = time.perf_counter() - t
        if "video" in self.modalities:
            t = time.perf_counter()
            if "video" in row:
                ex["video"] = read_video(self._file(row["video"]), cfg.frames, cfg.image_size, start, end)
            else:
                ex["video"] = read_image(self._file(row["image"]), cfg.frames, cfg.image_size)
                ex["static"] = True                   # identical frames: collate masks all of them alike
            timing["video"] = time.perf_counter() - t
        if "audio" in self.modalities:
            t = time.perf_counter()
            own = "audio" not in row                      # the video's own sound track: the video's clock
            src = self._file(row["video"] if own else row["audio"])
            ex["audio"] = read_audio(src, cfg.sample_rate, start, end, cfg.max_audio_s, cfg.min_audio_samples,
                                     video_clock=own)
            timing["audio"] = time.perf_counter() - t
        for k in LABEL_FIELDS:
            if k in row:
                ex[k] = row[k]
        if self.targets is not None:
            ids = self.targets.get(i, row)
            if ids == "stale":   # the row changed since `tokenize`: its ids are made on the device. Reported by
                ex["stale_targets"] = True   # the loader's process, not here (a worker's print breaks the bar)
            elif ids is not None:
                ex.update(ids)
        ex["timing"] = timing
        return ex


def load_examples(path, cfg, tokenizer):
    """Every decodable example of a manifest, in memory (downstream splits are small; decoding once saves
    every later epoch). Bad rows are skipped with a count, as the pretraining loader does."""
    ds = ManifestDataset(path, cfg, tokenizer, use_targets=False)
    out, bad = [], []
    for i in range(len(ds)):
        try:
            out.append(ds[i])
        except BadExample as e:
            bad.append(f"line {ds.line(i)}: {e.reason}")
    if bad:
        print(f"eval: skipped {len(bad)} of {len(ds)} rows of {path}; first: {bad[0]}", file=sys.stderr)
    if not out:
        raise ValueError(f"{path}: no usable example")
    return out
