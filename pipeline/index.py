"""A manifest read row by row, without holding it: the byte offset and line number of every non-blank line,
built once into `<manifest>.index.npy` beside it, memory-mapped by every process (no per-row Python objects:
the pages are the file's, shared by every rank and worker), and rebuilt when the manifest's size or
modification time no longer match the ones it was built from. A row is read and parsed only when it is asked
for (`ManifestRows.row`).

    index.npy: int64 [n + 1, 2]; row 0 = (manifest size in bytes, modification time in ns), row 1 + i = (byte
    offset, line number from 1) of the i-th non-blank line.
"""
import json
import os
import sys

import numpy as np

INDEX_SUFFIX = ".index.npy"
CHUNK = 1 << 26                         # bytes read at a time while building an index (64 MiB)
WHITESPACE = np.array([9, 10, 11, 12, 13, 32], dtype=np.uint8)
BOM = b"\xef\xbb\xbf"                   # a UTF-8 byte-order mark (some editors write one) is not row 1's


def index_path(manifest):
    return os.path.abspath(manifest) + INDEX_SUFFIX


def _stamp(manifest):
    st = os.stat(manifest)
    return st.st_size, st.st_mtime_ns


def scan_lines(f, chunk=CHUNK):
    """(offsets, line numbers) of the non-blank lines of a binary file, read `chunk` bytes at a time: int64 [n]
    each. A line is blank when it holds only ASCII whitespace (and, on line 1, a byte-order mark)."""
    offsets, lines = [], []
    head = f.read(len(BOM))
    base = len(BOM) if head == BOM else 0                # a byte-order mark is line 1's, and no content
    line_no = 1
    pending_start, pending_content = 0, False        # the line the previous chunk ended inside
    buf = head[base:] + f.read(chunk)
    while buf:
        a = np.frombuffer(buf, dtype=np.uint8)
        content = ~np.isin(a, WHITESPACE)
        counts = np.concatenate([[0], np.cumsum(content, dtype=np.int64)])   # counts[j]: content bytes in a[:j]
        nl = np.flatnonzero(a == 10)
        starts = np.concatenate([[0], nl + 1])                                # segment starts within the chunk
        ends = np.concatenate([nl, [len(a)]])
        has = counts[ends] - counts[starts] > 0
        if len(nl):
            # the first segment finishes the pending line; the middle ones are whole lines; the last is pending
            first = pending_content or bool(has[0])
            if first:
                offsets.append(np.array([pending_start], dtype=np.int64))
                lines.append(np.array([line_no], dtype=np.int64))
            whole = np.arange(1, len(nl))
            keep = whole[has[1:len(nl)]]
            offsets.append(base + starts[keep])
            lines.append(line_no + keep)
            line_no += len(nl)
            pending_start, pending_content = base + int(starts[-1]), bool(has[-1])
        else:
            pending_content = pending_content or bool(has[0])
        base += len(a)
        buf = f.read(chunk)
    if pending_content:                                                      # a last line without a newline
        offsets.append(np.array([pending_start], dtype=np.int64))
        lines.append(np.array([line_no], dtype=np.int64))
    if not offsets:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(offsets).astype(np.int64), np.concatenate(lines).astype(np.int64)


def index_array(manifest):
    """The index of `manifest` as an array (see the module docstring)."""
    stamp = _stamp(manifest)
    with open(manifest, "rb") as f:
        offsets, lines = scan_lines(f)
    index = np.empty((len(offsets) + 1, 2), dtype=np.int64)
    index[0] = stamp
    index[1:, 0], index[1:, 1] = offsets, lines
    return index


def build_index(manifest):
    """Scan `manifest` and write its index beside it, atomically (several processes may build at once: each
    renames its own file)."""
    out = index_path(manifest)
    tmp = f"{out}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        np.save(f, index_array(manifest))
    os.replace(tmp, out)


def load_index(manifest):
    """The index of `manifest`, memory-mapped, built (or rebuilt, when stale or damaged) first. Where the
    manifest's folder is read-only the index is built in memory instead (16 bytes a row), with a note."""
    path = index_path(manifest)
    if os.path.exists(path):
        try:
            index = np.load(path, mmap_mode="r")
            if index.ndim == 2 and index.shape[1] == 2 and len(index) and tuple(index[0]) == _stamp(manifest):
                return index
        except (ValueError, OSError):
            pass
    try:
        build_index(manifest)
    except OSError as e:
        print(f"data: cannot write {path} ({e}); indexing {manifest} in memory", file=sys.stderr)
        return index_array(manifest)
    return np.load(path, mmap_mode="r")


def parse_row(raw, first=False):
    """One line's bytes -> the row (a dict) or, for a line that cannot be one, the reason (a string)."""
    if first and raw.startswith(BOM):
        raw = raw[len(BOM):]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"not UTF-8 text: {e}"
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        return f"invalid JSON: {e}"
    return row if isinstance(row, dict) else f"not a JSON object: {text.strip()[:60]}"


class ManifestRows:
    """The non-blank lines of a manifest by position: len(rows), rows.line(i) (its line number from 1), rows.row(i)
    (a dict, or the reason it is not one), read on demand with one positioned read."""

    def __init__(self, manifest):
        self.path = os.path.abspath(manifest)
        self.index = load_index(self.path)
        self._fd, self._pid = None, None

    def __len__(self):
        return len(self.index) - 1

    def line(self, i):
        return int(self.index[1 + i, 1])

    def _read(self, offset):
        if self._fd is None or self._pid != os.getpid():     # a forked worker opens its own descriptor
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        size, out = 4096, b""
        while True:
            chunk = os.pread(self._fd, size, offset + len(out))
            out += chunk
            end = out.find(b"\n")
            if end >= 0:
                return out[:end]
            if len(chunk) < size:                                # the file ends without a newline
                return out
            size *= 2

    def row(self, i):
        if not 0 <= i < len(self):
            raise IndexError(f"{self.path}: row {i} of {len(self)}")
        offset = int(self.index[1 + i, 0])
        return parse_row(self._read(offset), first=offset == 0)

    def __iter__(self):
        """(line number, row or reason) for every row, in order."""
        for i in range(len(self)):
            yield self.line(i), self.row(i)

    def __getstate__(self):          # a descriptor does not travel to a spawned process: reopened there
        return {**self.__dict__, "_fd": None, "_pid": None}

    def __del__(self):
        if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
            os.close(self._fd)
