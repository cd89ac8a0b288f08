"""Media files to arrays: video and image frames through PyAV, audio through soundfile or PyAV (paper section 3:
"for each clip, we evenly sample 8 video frames"; the raw waveform for the speech encoder), and the writers the
toy world and the tests use.

    read_video(path, frames, size, start, end)   uint8 [T, size, size, 3], T frames evenly spaced, upright
    read_image(path, frames, size)               the same frame T times (a static clip)
    read_audio(path, sr, start, end, max_s)      float32 [N] mono at `sr`

A file that cannot become an example raises `BadExample` with the reason in words; the loader skips and counts it.
"""
import fractions
import itertools
import math
import os

import av
import numpy as np
import soundfile

DECODE_THREADS = 1                   # codec threads per worker: scale with DataLoader workers instead
SOUNDFILE_EXTS = (".wav", ".flac")


class BadExample(Exception):
    """A row that cannot become an example; `reason` says why in words (the loader skips and counts it)."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


def reason_kind(reason):
    """The short kind of a BadExample reason ("missing file", "undecodable video", ...) for summaries."""
    return reason.split(":")[0].split("(")[0].strip()


# ----------------------------------------------------------------------------------------------------
# Video and images through PyAV

def _open(path, what):
    if not os.path.exists(path):
        raise BadExample(f"missing file: {path}")
    if os.path.getsize(path) == 0:
        raise BadExample(f"empty file: {path}")
    try:
        return av.open(path)
    except (av.FFmpegError, OSError, ValueError) as e:
        raise BadExample(f"undecodable {what} (cannot open {path}: {e})") from e


def _rotation(frame, stream, path):
    """Counter-clockwise display rotation in degrees: display-matrix side data, else the old `rotate` tag."""
    r = frame.rotation
    # FFmpeg looks tags up ignoring case (av_dict_get); Matroska stores this one as ROTATE
    tag = next((v for k, v in stream.metadata.items() if k.lower() == "rotate"), None)
    if not r and tag:
        try:
            r = -float(tag)  # the tag is clockwise
        except ValueError:
            raise BadExample(f"unreadable rotate tag: {tag!r} in {path}") from None
    return int(round(r / 90.0)) * 90 % 360


def frame_to_rgb(frame, size, rotation=0):
    """One decoded frame -> uint8 [size, size, 3]: rotate for display, shorter side to `size`, centre crop."""
    w, h = frame.width, frame.height
    disp_w, disp_h = (h, w) if rotation % 180 else (w, h)
    s = size / min(disp_w, disp_h)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    nw, nh = max(nw, size), max(nh, size)  # both sides must cover the crop, whichever way it is turned
    img = frame.to_ndarray(width=nw, height=nh, format="rgb24", interpolation="BILINEAR")
    if rotation:
        img = np.rot90(img, k=rotation // 90)  # np.rot90 turns counter-clockwise, like the display matrix
    y0, x0 = (img.shape[0] - size) // 2, (img.shape[1] - size) // 2
    return np.ascontiguousarray(img[y0:y0 + size, x0:x0 + size])


def _frame_time(frame, tb):
    return float(frame.pts * tb) if frame.pts is not None else float(frame.time or 0.0)


def _decode_from(container, stream, t):
    """Frames of `stream` from the keyframe at or before time t (seconds, stream clock).

    MP4, MKV and WebM seek exactly; MPEG-TS and FLV may land after t (their seek goes by byte position), and
    the frame on display at t would be lost. So when the first frame decoded is later than t, seek again 1,
    2, 4, ... s earlier, down to the start of the stream.
    """
    tb, back = stream.time_base, 0.0
    while True:
        container.seek(max(0, int((t - back) / tb)), stream=stream, backward=True, any_frame=False)
        gen = container.decode(stream)
        first = next(gen, None)
        if first is None:
            if t - back <= 0:
                return iter(())
        elif _frame_time(first, tb) <= t + 1e-6 or t - back <= 0:
            return itertools.chain([first], gen)
        back = max(1.0, 2 * back)


def frames_at(container, stream, targets, seek=True):
    """The frame on display at each target time (seconds, stream clock): the last one with pts <= t.

    With seek=True we jump to the keyframe before a target whenever the stream's index has a keyframe
    between the last decoded frame and the target (or, without an index, when the gap exceeds 2 s), so a
    clip out of a long file decodes only a few GOPs; seek=False decodes everything from the start (the
    reference the tests compare with). A target before the first frame gets the first frame; one after
    the last frame gets the last. Returns a list of av.VideoFrame (repeated where targets share a frame).
    """
    tb = stream.time_base
    keyframes = sorted(float(e.timestamp * tb) for e in stream.index_entries if e.is_keyframe) if seek else []
    out = [None] * len(targets)
    gen, prev, nxt, done = None, None, None, False
    for i in sorted(range(len(targets)), key=targets.__getitem__):
        t = targets[i]
        ref = nxt if nxt is not None else prev
        last = _frame_time(ref, tb) if ref is not None else -math.inf
        jump = any(last < k <= t for k in keyframes) if keyframes else t - last > 2.0
        if gen is None or (seek and jump):
            gen = _decode_from(container, stream, t) if seek else container.decode(stream)
            prev, nxt, done = None, None, False
        if nxt is not None and _frame_time(nxt, tb) <= t:
            prev, nxt = nxt, None
        while nxt is None and not done:
            try:
                f = next(gen)
            except StopIteration:
                done = True
                break
            if _frame_time(f, tb) <= t + 1e-6:
                prev = f
            else:
                nxt = f
        out[i] = prev if prev is not None else nxt
        if out[i] is None:
            raise BadExample("no decodable video frames")
    return out


def read_video(path, frames, size, start=None, end=None, seek=True):
    """`frames` frames evenly spaced over [start, end] of a video -> uint8 [T, size, size, 3].

    The targets are the centres of T equal segments of the clip (start and end default to the stream's
    start and duration). Clips with fewer than T frames repeat frames; rotated phone videos are turned
    upright; odd resolutions are scaled (shorter side to `size`) and centre-cropped.
    """
    container = _open(path, "video")
    with container:
        if not container.streams.video:
            raise BadExample(f"no video stream in {path}")
        vs = container.streams.video[0]
        vs.thread_count = DECODE_THREADS
        tb = vs.time_base
        t0 = float(vs.start_time * tb) if vs.start_time is not None else 0.0
        if vs.duration:
            duration = float(vs.duration * tb)
        elif container.duration:
            duration = container.duration / 1e6
        else:
            duration = None
        a = float(start or 0.0)
        b = float(end) if end is not None else duration
        if b is None:  # unknown length (some streams): decode everything once to learn it
            times = [_frame_time(f, tb) for f in container.decode(vs)]
            if not times:
                raise BadExample(f"no decodable video frames in {path}")
            b = times[-1] - t0 + (times[-1] - times[-2] if len(times) > 1 else 0.04)
            container.seek(0, stream=vs)
        if duration is not None:
            if a >= duration:
                raise BadExample(f"clip starts at {a:.3f}s but the video lasts {duration:.3f}s")
            b = min(b, duration)
        if b <= a:
            raise BadExample(f"empty clip: start {a} >= end {b}")
        targets = [t0 + a + (i + 0.5) * (b - a) / frames for i in range(frames)]
        try:
            picked = frames_at(container, vs, targets, seek=seek)
            rotation = _rotation(picked[0], vs, path)
            cache = {}
            out = [cache.setdefault(id(f), frame_to_rgb(f, size, rotation)) for f in picked]
        except av.FFmpegError as e:
            raise BadExample(f"undecodable video {path}: {e}") from e
        return np.stack(out)


# EXIF Orientation -> the stored pixels turned for display (the tag says where the stored row 0 / column 0
# belong: 2 mirrored, 3 upside down, 4 flipped vertically, 5 transposed, 6 turned left, 7 transversed, 8 turned right)
EXIF_ORIENT = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
               5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1),
               7: lambda a: a[::-1, ::-1].transpose(1, 0, 2), 8: lambda a: np.rot90(a, 1)}


def jpeg_orientation(path):
    """The EXIF Orientation tag (1-8) of a JPEG file; None without one (or for another format).

    FFmpeg hands the tag on as the frame's display matrix, but PyAV gives only its angle, which for the
    mirrored orientations (2, 4, 5, 7) is not the right transform; so images read the tag themselves."""
    with open(path, "rb") as f:
        if f.read(2) != b"\xff\xd8":
            return None
        while True:  # marker segments up to the image data
            head = f.read(4)
            if len(head) < 4 or head[0] != 0xFF or head[1] in (0xD9, 0xDA):
                return None
            seg = f.read(int.from_bytes(head[2:], "big") - 2)
            if head[1] == 0xE1 and seg[:6] == b"Exif\x00\x00":
                t = seg[6:]  # a TIFF header: byte order, 42, offset of IFD0; IFD0: count, 12-byte entries
                order = {b"II": "little", b"MM": "big"}.get(t[:2])
                if order is None:
                    return None
                ifd = int.from_bytes(t[4:8], order)
                for k in range(int.from_bytes(t[ifd:ifd + 2], order)):
                    e = t[ifd + 2 + 12 * k: ifd + 14 + 12 * k]
                    if int.from_bytes(e[:2], order) == 0x0112:
                        v = int.from_bytes(e[8:10], order)
                        return v if v in EXIF_ORIENT else None
                return None


def read_image(path, frames, size):
    """A still image -> uint8 [T, size, size, 3], the same frame T times.

    Images become static clips of the same `frames` count as videos, so the vision encoder (a video Swin,
    section 4.1: "images and sequence of frames") and the MVM token grid see one shape for every source.
    """
    container = _open(path, "image")
    with container:
        if not container.streams.video:
            raise BadExample(f"no image stream in {path}")
        try:
            frame = next(container.decode(video=0), None)
        except av.FFmpegError as e:
            raise BadExample(f"undecodable image {path}: {e}") from e
        if frame is None:
            raise BadExample(f"undecodable image {path}: no frame")
        orientation = jpeg_orientation(path)
        if orientation is None:
            img = frame_to_rgb(frame, size, _rotation(frame, container.streams.video[0], path))
        else:  # the square crop turns like the whole image (both sides scale by the same factor)
            img = np.ascontiguousarray(EXIF_ORIENT[orientation](frame_to_rgb(frame, size)))
    return np.repeat(img[None], frames, axis=0)


# ----------------------------------------------------------------------------------------------------
# Audio: soundfile for WAV/FLAC, PyAV for the rest (video containers included); 16 kHz mono

def resample(x, from_sr, to_sr):
    """float32 [N] mono at from_sr -> float32 [N * to_sr / from_sr] through libswresample (keeps the duration)."""
    if from_sr == to_sr:
        return np.asarray(x, dtype=np.float32)
    rs = av.AudioResampler(format="flt", layout="mono", rate=to_sr)
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x, dtype=np.float32)[None], format="flt", layout="mono")
    frame.sample_rate = from_sr
    frame.pts = 0
    chunks = [o.to_ndarray()[0] for o in rs.resample(frame)] + [o.to_ndarray()[0] for o in rs.resample(None)]
    return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)


def _read_audio_av(path, sr, start, end, max_s=None, video_clock=False):
    """[start, end] of a file's first audio stream at `sr` mono (through PyAV); decoding stops once
    `end` or start + max_s is reached (a clip out of a long file decodes only that far).

    Times count from the audio stream's start, or with video_clock=True (the sound track of a row's video)
    from the video stream's start, the origin `read_video` uses: streams of one container can start at
    different times (MPEG-TS and FLV written by FFmpeg start the video 64 ms after the audio; broadcast
    recordings by more), and one origin keeps picture and sound in sync. Sound that starts after the origin is
    preceded by silence.
    """
    container = _open(path, "audio")
    with container:
        if not container.streams.audio:
            raise BadExample(f"no audio stream in {path}")
        st = container.streams.audio[0]
        tb = st.time_base
        clock = container.streams.video[0] if video_clock and container.streams.video else st
        t0 = float(clock.start_time * clock.time_base) if clock.start_time is not None else 0.0
        rs = av.AudioResampler(format="flt", layout="mono", rate=sr)
        if start > 0:
            container.seek(max(0, int((t0 + start) / tb)), stream=st, backward=True)
        chunks, first, n = [], None, 0
        stop = t0 + min(end if end is not None else math.inf, start + (max_s if max_s is not None else math.inf))
        try:
            for frame in container.decode(st):
                if first is None:
                    first = _frame_time(frame, tb)
                frame.pts = None  # let the resampler count samples (robust to timestamp gaps)
                new = [o.to_ndarray()[0] for o in rs.resample(frame)]
                chunks += new
                n += sum(len(c) for c in new)
                if first + n / sr >= stop:
                    break
            chunks += [o.to_ndarray()[0] for o in rs.resample(None)]
        except av.FFmpegError as e:
            raise BadExample(f"undecodable audio {path}: {e}") from e
        if not chunks:
            raise BadExample(f"no decodable audio in {path}")
        x = np.concatenate(chunks)
        skip = int(round((t0 + start - first) * sr))
        if skip < 0:  # the first sound comes after the clip's start: silence until then
            return np.concatenate([np.zeros(-skip, np.float32), x])
        return x[skip:]


def samples_in(seconds, sr):
    """Samples in `seconds` at `sr` Hz as read_audio cuts them (and collate's pad_to_max pads to)."""
    return int(round(seconds * sr))


def read_audio(path, sr=16000, start=None, end=None, max_s=None, min_samples=1, video_clock=False):
    """Audio of [start, end] seconds -> float32 [N] mono at `sr`, at most max_s seconds from the start.
    video_clock: the file is a video whose own sound track this is; times count from its video stream's
    start, as the frames' do (`_read_audio_av`)."""
    a = float(start or 0.0)
    if path.lower().endswith(SOUNDFILE_EXTS):
        if not os.path.exists(path):
            raise BadExample(f"missing file: {path}")
        try:
            info = soundfile.info(path)
            i0 = int(round(a * info.samplerate))
            i1 = info.frames if end is None else min(info.frames, int(round(float(end) * info.samplerate)))
            if max_s is not None:
                i1 = min(i1, i0 + int(math.ceil(max_s * info.samplerate)))
            if i0 >= info.frames:
                raise BadExample(f"clip starts at {a:.3f}s but the audio lasts {info.frames / info.samplerate:.3f}s")
            x, _ = soundfile.read(path, start=i0, stop=i1, dtype="float32", always_2d=True)
        except (RuntimeError, soundfile.SoundFileError) as e:  # LibsndfileError is a RuntimeError
            raise BadExample(f"undecodable audio {path}: {e}") from e
        x = resample(x.mean(axis=1), info.samplerate, sr)
    else:
        x = _read_audio_av(path, sr, a, end, max_s, video_clock)
    limit = math.inf if end is None else float(end) - a
    if max_s is not None:
        limit = min(limit, max_s)
    if limit < math.inf:
        x = x[:samples_in(limit, sr)]
    if len(x) < min_samples:
        raise BadExample(f"audio shorter than one speech frame: {len(x)} samples at {sr} Hz (< {min_samples}) in {path}")
    return np.ascontiguousarray(x, dtype=np.float32)


# ----------------------------------------------------------------------------------------------------
# Writers (the toy world, the decode benchmark and the tests make real files with these)

def write_mp4(path, frames, fps, audio=None, sr=16000, rotation=0, keyint=10, pix_fmt="yuv420p", preset="ultrafast",
               fmt="mp4", start_s=0.0, metadata=None, crf=None):
    """H.264 MP4 (+ AAC audio [C, N] float32) written deterministically; rotation sets the display matrix.
    metadata: tags on the video stream (a legacy `rotate` tag in tests).
    frames: uint8 [T, H, W, 3]; odd H or W need pix_fmt="yuv444p". fmt: the container ("mpegts", "flv" in tests).
    start_s: both streams' first timestamp (a cut broadcast recording starts late; 0: timestamps from 0).
    crf: x264's constant quality (None: its default, 23)."""
    with av.open(path, "w", format=fmt, options={"fflags": "+bitexact"}) as c:
        options = {"preset": preset, "g": str(keyint), "threads": "1", **({"crf": str(crf)} if crf is not None else {})}
        vs = c.add_stream("libx264", rate=fps, options=options)
        vs.height, vs.width = frames.shape[1:3]
        vs.pix_fmt = pix_fmt
        vs.codec_context.flags |= av.codec.context.Flags.bitexact
        if rotation:
            vs.set_display_rotation(rotation)
        vs.metadata.update(metadata or {})
        if audio is not None:
            st = c.add_stream("aac", rate=sr, layout="mono" if audio.shape[0] == 1 else "stereo",
                              options={"aac_coder": "fast"})
        for i, img in enumerate(frames):
            f = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            if start_s:
                f.pts = round(start_s * fps) + i
            for p in vs.encode(f):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)
        if audio is not None:
            a = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio.T.reshape(1, -1)), format="flt",
                                           layout="mono" if audio.shape[0] == 1 else "stereo")
            a.sample_rate, a.pts = sr, round(start_s * sr)
            for p in st.encode(a):
                c.mux(p)
            for p in st.encode(None):
                c.mux(p)


def write_jpeg(path, img):
    cc = av.CodecContext.create("mjpeg", "w")
    cc.width, cc.height, cc.pix_fmt, cc.time_base = img.shape[1], img.shape[0], "yuvj420p", fractions.Fraction(1, 1)
    cc.flags |= av.codec.context.Flags.bitexact
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24").reformat(format="yuvj420p")
    with open(path, "wb") as f:
        for p in cc.encode(frame) + cc.encode(None):
            f.write(bytes(p))
