"""pipeline/media.py: video, image and audio decoding on real files written here (H.264 MP4 with AAC, JPEG,
WAV, FLAC), on the CPU.
"""
import json

import av
import numpy as np
import pytest
import soundfile
from common import frame_index, grey_clip

import data
import pipeline.commands
import pipeline.loader
import pipeline.manifest
import pipeline.media
import pipeline.sampler
import pipeline.targets
import pipeline.text
import pipeline.toy

CFG = data.TOY_DATA


# ----------------------------------------------------------------------------------------------------
# Video

# veryfast has B-frames (decode order != display order); MPEG-TS and FLV seek by byte position and may land
# after the target (frames_at then seeks further back)
@pytest.mark.parametrize("preset, fmt", [("ultrafast", "mp4"), ("veryfast", "mp4"), ("veryfast", "mpegts"),
                                         ("ultrafast", "flv")])
def test_seek_matches_decoding_everything(tmp_path, preset, fmt):
    path = grey_clip(tmp_path / "g.vid", n=40, fps=10, keyint=5, preset=preset, fmt=fmt)  # 4 s, keyframe every 0.5 s
    for start, end in [(None, None), (1.3, 3.7), (2.95, 3.05), (0.0, 0.4), (3.0, 4.0), (2.0, 10.0)]:
        a = pipeline.media.read_video(path, 4, 32, start, end, seek=True)
        b = pipeline.media.read_video(path, 4, 32, start, end, seek=False)
        assert np.array_equal(a, b), (start, end)
        s, e = start or 0.0, min(end or 4.0, 4.0)                 # an end past the file: the file's end
        want = [int((s + (i + 0.5) * (e - s) / 4) * 10 + 1e-6) for i in range(4)]  # frame on display at t
        assert [frame_index(x) for x in a] == want, (start, end)


def test_short_clip_repeats_frames_and_bad_ranges(tmp_path):
    path = grey_clip(tmp_path / "short.mp4", n=2, fps=10)  # 0.2 s, 2 frames, asked for 8
    v = pipeline.media.read_video(path, 8, 32)
    assert v.shape == (8, 32, 32, 3)
    assert [frame_index(x) for x in v] == [0, 0, 0, 0, 1, 1, 1, 1]
    with pytest.raises(pipeline.media.BadExample, match="clip starts"):
        pipeline.media.read_video(path, 4, 32, start=5.0, end=6.0)


def test_rotated_video_is_upright(tmp_path):
    img = np.zeros((64, 80, 3), np.uint8)
    img[:, :40] = (220, 30, 30)   # left half red
    img[:, 40:] = (30, 30, 220)   # right half blue
    img[:12] = (30, 200, 30)      # top strip green
    frames = np.stack([img] * 6)
    pipeline.media.write_mp4(str(tmp_path / "up.mp4"), frames, 10)
    # a phone stores the sensor's orientation and a display matrix turning it upright
    pipeline.media.write_mp4(str(tmp_path / "rot.mp4"), np.rot90(frames, k=-1, axes=(1, 2)), 10, rotation=90)
    up = pipeline.media.read_video(str(tmp_path / "up.mp4"), 2, 64).astype(float)
    rot = pipeline.media.read_video(str(tmp_path / "rot.mp4"), 2, 64).astype(float)
    assert np.abs(up - rot).mean() < 6
    assert rot[0, 40, 10, 0] > 150 and rot[0, 40, 60, 2] > 150 and rot[0, 2, 32, 1] > 150


def test_legacy_rotate_tag_is_applied(tmp_path):
    """Before display matrices, FFmpeg wrote a clockwise `rotate` tag on the stream (Matroska keeps it as
    ROTATE; FFmpeg looks tags up ignoring case). A file with only the tag is turned upright as well."""
    img = np.zeros((64, 80, 3), np.uint8)
    img[:, :40] = (220, 30, 30)   # left half red
    img[:, 40:] = (30, 30, 220)   # right half blue
    img[:12] = (30, 200, 30)      # top strip green
    frames = np.stack([img] * 6)
    pipeline.media.write_mp4(str(tmp_path / "up.mkv"), frames, 10, fmt="matroska")
    pipeline.media.write_mp4(str(tmp_path / "tag.mkv"), np.rot90(frames, k=1, axes=(1, 2)), 10, fmt="matroska",
                    metadata={"rotate": "90"})
    with av.open(str(tmp_path / "tag.mkv")) as c:  # only the tag: no display matrix for PyAV to report
        assert next(c.decode(video=0)).rotation == 0 and c.streams.video[0].metadata.get("ROTATE") == "90"
    up = pipeline.media.read_video(str(tmp_path / "up.mkv"), 2, 64).astype(float)
    rot = pipeline.media.read_video(str(tmp_path / "tag.mkv"), 2, 64).astype(float)
    assert np.abs(up - rot).mean() < 6
    pipeline.media.write_mp4(str(tmp_path / "bad.mkv"), frames, 10, fmt="matroska", metadata={"rotate": "sideways"})
    with pytest.raises(pipeline.media.BadExample, match=r"unreadable rotate tag: 'sideways' in .*bad\.mkv"):
        pipeline.media.read_video(str(tmp_path / "bad.mkv"), 2, 64)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_jpeg_exif_orientation_is_applied(tmp_path, orientation):
    """A phone photo stores the sensor's pixels and an EXIF Orientation tag saying how to show them;
    read_image shows every one of the eight upright (the mirrored ones too)."""
    img = np.zeros((64, 80, 3), np.uint8)
    img[:, :40] = (220, 30, 30)   # left half red
    img[:, 40:] = (30, 30, 220)   # right half blue
    img[:12] = (30, 200, 30)      # top strip green
    inverse = {6: 8, 8: 6}.get(orientation, orientation)  # the others undo themselves
    stored = np.ascontiguousarray(pipeline.media.EXIF_ORIENT[inverse](img))
    pipeline.media.write_jpeg(str(tmp_path / "up.jpg"), img)
    pipeline.media.write_jpeg(str(tmp_path / "sensor.jpg"), stored)
    raw = open(tmp_path / "sensor.jpg", "rb").read()
    tiff = b"II*\x00" + (8).to_bytes(4, "little") + (1).to_bytes(2, "little")  # IFD0 with one entry:
    tiff += bytes.fromhex("1201 0300 01000000") + orientation.to_bytes(2, "little") + bytes(6)  # 0x0112 SHORT
    app1 = b"Exif\x00\x00" + tiff
    (tmp_path / "exif.jpg").write_bytes(raw[:2] + b"\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1 + raw[2:])
    assert pipeline.media.jpeg_orientation(str(tmp_path / "exif.jpg")) == orientation
    assert pipeline.media.jpeg_orientation(str(tmp_path / "up.jpg")) is None
    up = pipeline.media.read_image(str(tmp_path / "up.jpg"), 1, 64).astype(float)
    exif = pipeline.media.read_image(str(tmp_path / "exif.jpg"), 1, 64).astype(float)
    plain = pipeline.media.read_image(str(tmp_path / "sensor.jpg"), 1, 64).astype(float)
    assert np.abs(up - exif).mean() < 6
    assert (np.abs(up - plain).mean() > 40) == (orientation != 1)


def test_odd_resolution_and_image(tmp_path):
    rng = np.random.default_rng(0)
    pipeline.media.write_mp4(str(tmp_path / "odd.mp4"), rng.integers(0, 255, (5, 61, 97, 3), dtype=np.uint8), 10,
                    pix_fmt="yuv444p")
    assert pipeline.media.read_video(str(tmp_path / "odd.mp4"), 4, 64).shape == (4, 64, 64, 3)
    img = np.zeros((50, 90, 3), np.uint8)
    img[:, 45:] = 200
    pipeline.media.write_jpeg(str(tmp_path / "a.jpg"), img)
    v = pipeline.media.read_image(str(tmp_path / "a.jpg"), 4, 32)
    assert v.shape == (4, 32, 32, 3) and all(np.array_equal(v[0], x) for x in v)
    assert v[0, :, :10].mean() < 20 and v[0, :, -10:].mean() > 180  # centre crop keeps both halves


# ----------------------------------------------------------------------------------------------------
# Audio

def _sine(sr, seconds, hz=440.0, channels=1):
    t = np.arange(int(sr * seconds)) / sr
    x = (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)
    return np.stack([x] * channels, 1)


def _peak_hz(x, sr=16000):
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.argmax(spec) * sr / len(x)


@pytest.mark.parametrize("sr,channels,fmt", [(44100, 2, "WAV"), (8000, 1, "WAV"), (48000, 2, "FLAC"), (16000, 1, "WAV")])
def test_resampling_keeps_duration_and_pitch(tmp_path, sr, channels, fmt):
    path = str(tmp_path / f"a.{fmt.lower()}")
    soundfile.write(path, _sine(sr, 1.5, 440, channels), sr, format=fmt)
    x = pipeline.media.read_audio(path, 16000)
    assert abs(len(x) - 24000) <= 2 and x.dtype == np.float32
    assert abs(_peak_hz(x) - 440) < 3
    cut = pipeline.media.read_audio(path, 16000, start=0.25, end=1.0)
    assert abs(len(cut) - 12000) <= 2


@pytest.mark.parametrize("fmt", ["WAV", "FLAC"])
def test_cut_and_mixdown_of_a_sound_file_are_exact(tmp_path, fmt):
    """At 16 kHz nothing is resampled: [start, start + max_s) of the file, the mean of its two channels (two
    different tones, so neither channel alone passes), also when start lies beyond max_s."""
    sr = 16000
    t = np.arange(10 * sr) / sr
    x = 0.3 * np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 1000 * t)], 1)
    path = str(tmp_path / f"two.{fmt.lower()}")
    soundfile.write(path, x, sr, format=fmt)
    raw, _ = soundfile.read(path, dtype="float32")                           # [N, 2] as stored
    y = pipeline.media.read_audio(path, sr, start=5.0, end=9.0, max_s=2.0)
    assert len(y) == 2 * sr
    np.testing.assert_allclose(y, raw[5 * sr:7 * sr].mean(1), atol=1e-6)


def test_audio_from_video_container(tmp_path):
    wave = _sine(48000, 2.0, 300, 2).T.copy()  # [2, N] stereo 48 kHz AAC
    path = grey_clip(tmp_path / "av.mp4", n=20, audio=wave, sr=48000)
    x = pipeline.media.read_audio(path, 16000)
    assert abs(len(x) - 32000) <= 160 and abs(_peak_hz(x) - 300) < 3
    cut = pipeline.media.read_audio(path, 16000, start=0.5, end=1.5)
    assert abs(len(cut) - 16000) <= 2
    assert len(pipeline.media.read_audio(path, 16000, max_s=1.2)) == 19200
    # decoding stops at max_s (a row without `end` in a long file), with the samples a full decode gives
    head = pipeline.media._read_audio_av(path, 16000, 0.5, None, max_s=0.5)
    assert 8000 <= len(head) < 8000 + 1600                      # 0.5 s, and at most ~2 AAC frames more
    assert np.array_equal(head[:8000], pipeline.media.read_audio(path, 16000, start=0.5)[:8000])
    with pytest.raises(pipeline.media.BadExample, match="no audio stream"):
        pipeline.media.read_audio(grey_clip(tmp_path / "mute.mp4", n=5), 16000)


@pytest.mark.parametrize("fmt, start_s", [("mp4", 0.0), ("mpegts", 0.0), ("flv", 0.0), ("matroska", 0.0),
                                          ("mpegts", 10.0)])
def test_picture_and_sound_of_one_file_stay_in_sync(tmp_path, fmt, start_s):
    """A click in the sound and a bright frame at the same moments (1, 2, 3 s) land at the same clip times,
    whatever the container: MPEG-TS and FLV start the video 64 ms after the audio, so with each stream
    measured from its own start the clicks came 64 ms late there (1.064 s; MP4 and Matroska 1.000 s). Also
    when the file's timestamps start at 10 s (a cut recording): `start` / `end` count from the file's start."""
    sr = 16000
    x = np.zeros(4 * sr, np.float32)
    for c in (1.0, 2.0, 3.0):
        x[int(c * sr):int(c * sr) + 64] = 0.8
    frames = np.stack([np.full((48, 64, 3), 200 if f in (10, 20, 30) else 20, np.uint8) for f in range(40)])
    path = str(tmp_path / f"sync.{fmt}")
    pipeline.media.write_mp4(path, frames, 10, x[None], sr, fmt=fmt, start_s=start_s)
    manifest = tmp_path / "sync.jsonl"
    manifest.write_text(json.dumps({"video": path, "start": 0.5, "end": 2.5}) + "\n")
    y = pipeline.manifest.ManifestDataset(str(manifest), data.TOY_DATA)[0]["audio"]          # the loader's own path
    assert len(y) == 2 * sr
    clicks = np.flatnonzero(np.abs(y) > 0.3)
    first_click = 0.5 + clicks[0] / sr
    v = pipeline.media.read_video(path, 20, 32, start=0.5, end=2.5)          # frame centres 0.55, 0.65, ..., 2.45
    bright = [0.5 + (i + 0.5) * 0.1 for i in range(20) if v[i].mean() > 100]
    assert abs(first_click - 1.0) < 0.005, first_click             # measured: 1.000 in all four
    assert abs(bright[0] - 1.05) < 1e-6, bright                    # the frame on display from 1.0 s
