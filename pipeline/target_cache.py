"""Offline VQ targets on disk: `python -m pipeline tokenize` writes them (pipeline/targets.py), the loader reads
them. A manifest's rows are kept in shards of `SHARD_ROWS` rows, each shard a few memory-mapped arrays in
`<name>.targets/` beside the manifest:

    shard-00000.key.npy    uint64 [R]                   the key of the row (`row_key`) its ids were made from; 0: none yet
    shard-00000.video.npy  int32 [R, T, H/16, W/16]     visual token ids (manifests with video)
    shard-00000.audio.npy  int32 [R, T_s(, G)]          speech token ids, -100 past the row's frames (with audio)
    meta.json              the clip shape, the target tokenizers' fingerprint, the number of rows, the shard size

Row i of the manifest (its i-th non-blank line) is row i % R of shard i // R: reading its ids costs one small read
per array. A row is used only when its stored key is the key of the row as the manifest holds it now (an edited
row gets its ids on the device), and a shard is written ids first, key last, so a row cut short by an
interrupted run reads as not written.
"""
import hashlib
import json
import os
import shutil
import sys

import numpy as np

SHARD_ROWS = 16384
PAD = -100


def targets_dir(manifest):
    """Where `python -m pipeline tokenize` writes a manifest's VQ targets: beside it, `<name>.targets/`."""
    root, _ = os.path.splitext(manifest)
    return root + ".targets"


def cache_meta(cfg):
    """The clip shape a cache is for: a cache of another one is not used."""
    return {"frames": cfg.frames, "image_size": cfg.image_size, "token_patch": cfg.token_patch,
            "sample_rate": cfg.sample_rate, "max_audio_s": cfg.max_audio_s}


def row_key(row):
    """The key stored with a row's ids: a hash of the row (nonzero), so that ids are used only for the row they
    were made from (a changed media file at the same path and with the same row is not detected)."""
    return int(hashlib.sha256(json.dumps(row, sort_keys=True).encode()).hexdigest()[:16], 16) or 1


class TargetCache:
    """The shards of one manifest's cache. `.get(i, row)` reads; `.write(i, row, arrays)` and `.flush()` write."""

    def __init__(self, folder, meta, mode="r"):
        self.folder, self.meta, self.mode = folder, meta, mode
        self.shard_rows = meta["shard_rows"]
        self._open = {}                          # {(shard, field): memmap}, opened on first use

    @staticmethod
    def open(manifest, cfg):
        """The cache of `manifest` for this clip shape, or None (none there, or written for another clip shape or
        in another layout: said on stderr)."""
        folder = targets_dir(manifest)
        meta_path = os.path.join(folder, "meta.json")
        if not os.path.exists(meta_path):
            return None
        with open(meta_path) as f:
            meta = json.load(f)
        want = cache_meta(cfg)
        if "shard_rows" not in meta or any(meta.get(k) != v for k, v in want.items()):
            print(f"data: ignoring {folder}: written for {meta}, not {want} in shards; re-run `python -m pipeline "
                  f"tokenize`", file=sys.stderr)
            return None
        return TargetCache(folder, meta)

    def _path(self, shard, field):
        return os.path.join(self.folder, f"shard-{shard:05d}.{field}.npy")

    def _array(self, shard, field, shape=None, dtype=None):
        """A shard's array, memory-mapped (read-only when reading); with `shape`, created when missing."""
        k = (shard, field)
        if k not in self._open:
            path = self._path(shard, field)
            if os.path.exists(path):
                self._open[k] = np.load(path, mmap_mode="r" if self.mode == "r" else "r+")
            elif shape is None:
                return None
            else:
                rows = min(self.shard_rows, self.meta["rows"] - shard * self.shard_rows)
                a = np.lib.format.open_memmap(path + ".tmp", mode="w+", dtype=dtype, shape=(rows,) + tuple(shape))
                a[...] = 0 if field == "key" else PAD
                a.flush()
                del a
                os.replace(path + ".tmp", path)
                self._open[k] = np.load(path, mmap_mode="r+")
        return self._open[k]

    def key(self, i):
        """The key stored for row i (0: not written; also for rows past the ones the cache was made for)."""
        if i >= self.meta["rows"]:
            return 0
        keys = self._array(i // self.shard_rows, "key")
        return 0 if keys is None else int(keys[i % self.shard_rows])

    def get(self, i, row):
        """Row i's ids {"video_targets", "audio_targets"} (numpy) if they were made from `row`; "stale" if made
        from another row at that position; None if not written."""
        stored = self.key(i)
        if stored == 0:
            return None
        if stored != row_key(row):
            return "stale"
        shard, j = divmod(i, self.shard_rows)
        out = {}
        for field in ("video", "audio"):
            a = self._array(shard, field)
            if a is not None:
                out[f"{field}_targets"] = np.array(a[j])
        return out

    def write(self, i, row, arrays):
        """Store row i's ids (arrays: {"video_targets": [T, h, w], "audio_targets": [T_s(, G)]}), then its key."""
        shard, j = divmod(i, self.shard_rows)
        for name, v in arrays.items():
            field = name[:-len("_targets")]
            shape = (self.meta["audio_frames"],) + v.shape[1:] if field == "audio" else v.shape
            a = self._array(shard, field, shape, np.int32)
            a[j] = PAD
            a[j][tuple(slice(0, n) for n in v.shape)] = v
        self._array(shard, "key", (), np.uint64)[j] = row_key(row)

    def flush(self):
        """Ids to disk before keys: a key on disk always has its ids there."""
        for (_, field), a in self._open.items():
            if field != "key":
                a.flush()
        for (_, field), a in self._open.items():
            if field == "key":
                a.flush()

    @staticmethod
    def prepare(manifest, meta):
        """Make the folder `tokenize` writes into: kept when its meta.json is `meta` (an interrupted or earlier
        run of the same tokenizers, continued), else emptied first (another cache). Returns True if kept."""
        folder = targets_dir(manifest)
        meta_path = os.path.join(folder, "meta.json")
        if os.path.exists(meta_path):
            with open(meta_path) as f:
                if json.load(f) == meta:
                    return True
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        with open(meta_path + ".tmp", "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(meta_path + ".tmp", meta_path)
        return False
