"""data.py's batches and pipeline/'s manifests, offline targets, toy world and commands: every field combination,
collation and its masks, the target cache, the toy world, `python -m pipeline`.
"""
import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
from common import write_manifest

import data
import pipeline.commands
import pipeline.index
import pipeline.loader
import pipeline.manifest
import pipeline.precut
import pipeline.media
import pipeline.sampler
import pipeline.targets
import pipeline.text
import pipeline.toy

CFG = data.TOY_DATA


def test_collate_masks_images_in_every_frame_and_videos_with_a_tube(tmp_path, tok):
    """collate gives an image row (a static clip) one 2D mask on all of its frames and keeps appendix A.1's
    tube for video rows: their lengths spread over [ceil(T/2), T]. Then end to end: on an image batch from a
    manifest, every masked token cell is hidden in every frame of the encoder's input (the Video Swin patch
    mask), while the target ids, computed by the model's own tokenizer, are the same in every frame: a frame
    left visible would hand the encoder the answer."""
    from data import tube_to_patch_mask
    from icode import ICode, preset
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        pipeline.media.write_jpeg(str(tmp_path / f"{i}.jpg"), rng.integers(0, 255, (64, 80, 3), dtype=np.uint8))
        rows.append({"image": f"{i}.jpg", "text": "a red circle"})
    ds = pipeline.manifest.ManifestDataset(write_manifest(tmp_path / "img.jsonl", rows), CFG, tok)
    examples = [ds[i] for i in range(len(ds))]
    assert all(e["static"] for e in examples)
    T, h = CFG.frames, CFG.image_size // CFG.token_patch
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        m = data.collate(examples, CFG, tok, g)["video_mask"]                    # [B, T, h, w]
        assert all(m[b, 0].any() and all(torch.equal(m[b, t], m[b, 0]) for t in range(T)) for b in range(len(m)))
    video = {k: v for k, v in examples[0].items() if k != "static"}            # the same clip as a video row
    lengths = {int(data.collate([video] * 8, CFG, tok, g)["video_mask"][b].flatten(1).any(1).sum())
               for _ in range(20) for b in range(8)}
    assert lengths == set(range(math.ceil(T / 2), T + 1)), lengths
    batch = data.collate(examples, CFG, tok, g)
    model = ICode(preset("tiny", text_vocab=tok.vocab_size))
    ids = model.targets(batch)["video"]                                         # -100 where not masked
    full = model.video_tokenizer(batch["video"])                                # [B, T, h, w] every cell's id
    assert all(torch.equal(full[:, t], full[:, 0]) for t in range(T))           # identical frames, identical ids
    patch = tube_to_patch_mask(batch["video_mask"])                             # [B, T/2, H/4, W/4]
    seen = ~patch.reshape(len(examples), T // 2, h, 4, h, 4).all(5).all(3)      # [B, T/2, h, w] cell visible
    masked = (ids != -100).any(1)                                               # [B, h, w] a masked cell
    assert masked.any() and not (seen & masked[:, None]).any()


# ----------------------------------------------------------------------------------------------------
# Manifests, every field combination, collation

COMBOS = [  # row fields -> modalities
    (dict(video="video/000000.mp4", text="a red circle", caption="caption here"), ("video", "text", "audio")),
    (dict(video="video/000000.mp4"), ("video", "audio")),
    (dict(video="video/000000.mp4", text="a red circle", mute=True), ("video", "text")),
    (dict(video="video/000000.mp4", start=0.5, end=1.5, text="clip"), ("video", "text", "audio")),
    (dict(video="video/000000.mp4", audio="speech_text/000002.wav"), ("video", "audio")),
    (dict(image="image_text/000000.jpg", text="a red circle"), ("video", "text")),
    (dict(image="image_text/000000.jpg", audio="speech_text/000000.flac"), ("video", "audio")),
    (dict(audio="speech_text/000001.wav", text="left orange"), ("text", "audio")),
    (dict(image="image_text/000000.jpg", caption="only a caption"), ("video", "text")),
    (dict(text="just text", label=1), ("text",)),
]


@pytest.mark.parametrize("row,mods", COMBOS)
def test_every_field_combination(toy, tok, row, mods):
    path = write_manifest(os.path.join(toy, "combo.jsonl"), [row, row])
    ds = pipeline.manifest.ManifestDataset(path, CFG, tok)
    assert ds.modalities == mods and ds.name == "combo"
    b = data.collate([ds[0], ds[1]], CFG, tok, torch.Generator().manual_seed(0))
    keys = {"video": {"video", "video_mask"}, "text": {"text_ids", "text_ids_clean", "text_attention", "text_labels"},
            "audio": {"audio", "audio_attention", "audio_mask"}}
    for m, ks in keys.items():
        assert (ks <= set(b)) == (m in mods) and (not ks & set(b)) == (m not in mods)
    assert b["modalities"] == mods and b["source"] == "combo" and b["index"] == [("combo", 1), ("combo", 2)]
    if "video" in mods:
        assert b["video"].shape == (2, 3, CFG.frames, 64, 64) and b["video_mask"].shape == (2, CFG.frames, 4, 4)
        u8 = torch.from_numpy(ds[0]["video"]).permute(3, 0, 1, 2).float()         # [3, T, H, W] 0..255
        want = (u8 / 255 - torch.tensor(CFG.mean).view(3, 1, 1, 1)) / torch.tensor(CFG.std).view(3, 1, 1, 1)
        torch.testing.assert_close(b["video"][0], want, atol=1e-5, rtol=1e-5)   # ImageNet mean / std per channel
    if "audio" in mods:
        n = b["audio"].shape[1]
        want = int(round(((row.get("end") or 2.0) - (row.get("start") or 0.0)) * 16000))
        assert n == want and b["audio_attention"].all()
        assert b["audio_mask"].shape == (2, int(data.speech_frames(n)))
    if "text" in mods:
        ids = b["text_ids_clean"]
        assert ids[:, 0].eq(tok.cls_id).all()
        if "caption" in row and "text" in row:  # section 4.2.2: caption and transcript joined
            assert (ids[0] == tok.sep_id).sum() == 2
    if "label" in row:
        assert b["labels"]["label"].tolist() == [1, 1]


def test_collate_masks_respect_padding_and_specials(toy, tok):
    ds = pipeline.manifest.ManifestDataset(os.path.join(toy, "speech_text.jsonl"), CFG, tok)
    exs = [ds[i] for i in range(len(ds))]
    exs[0]["audio"] = exs[0]["audio"][:5000]  # one short row: padding must never be masked
    b = data.collate(exs, CFG, tok, torch.Generator().manual_seed(1))
    frames = [int(data.speech_frames(len(e["audio"]))) for e in exs]
    for i, n in enumerate(frames):
        assert not b["audio_mask"][i, n:].any() and b["audio_mask"][i, :n].any()
        assert b["audio_attention"][i].sum() == len(exs[i]["audio"])
    lab, ids, clean = b["text_labels"], b["text_ids"], b["text_ids_clean"]
    special = ~b["text_attention"] | torch.isin(clean, torch.tensor(tok.special_ids))
    assert not (lab != -100)[special].any()
    assert torch.equal(lab[lab != -100], clean[lab != -100])
    assert torch.equal(ids[lab == -100], clean[lab == -100])
    # the model's input is the corrupted text: most selected tokens are [MASK] (80% of them in expectation;
    # mask_tokens' statistics are tested in test_masking.py), not the clean ids
    big = data.collate(exs * 10, CFG, tok, torch.Generator().manual_seed(2))
    sel = big["text_labels"] != -100
    assert sel.sum() >= 20 and (big["text_ids"][sel] == tok.mask_id).float().mean() >= 0.6


def test_collate_draws_each_mask_with_its_own_setting(toy, tok):
    """Ratios unlike the defaults and unlike each other, each visible in its own mask: MLM selects ~20% of the
    eligible tokens; the tube masks round(0.75 * 16) = 12 of a frame's 16 cells; spans of 4 frames started
    at 3% of the frames cover ~11% (~1 - 0.97^4; the defaults give ~57%)."""
    cfg = dataclasses.replace(CFG, text_mask_ratio=0.2, tube_ratio=0.75, span_p=0.03, span_len=4)
    ds = pipeline.manifest.ManifestDataset(os.path.join(toy, "video.jsonl"), cfg, tok)
    b = data.collate([ds[i] for i in range(len(ds))] * 20, cfg, tok, torch.Generator().manual_seed(0))
    eligible = b["text_attention"] & ~torch.isin(b["text_ids_clean"], torch.tensor(tok.special_ids))
    share = (b["text_labels"] != -100)[eligible].float().mean().item()
    assert abs(share - 0.2) < 0.05, share                  # ~1,000 eligible tokens: std ~0.013
    per_frame = b["video_mask"].flatten(2).sum(-1)          # [B, T] masked cells per frame
    assert set(per_frame[per_frame > 0].tolist()) == {12}
    cover = b["audio_mask"].float().mean().item()           # every clip 2 s: no padding
    assert abs(cover - 0.11) < 0.03, cover


def test_masks_follow_step_and_row_not_rank_or_batch(toy, tok):
    """Each example's masks come from a generator seeded by (seed, step, source, row): the same row at the same
    step gets the same masks whichever rank reads it and whatever else is in its batch (what resuming on another
    number of processes needs), other masks at another step; examples of one batch differ."""
    ds = pipeline.manifest.ManifestDataset(os.path.join(toy, "video.jsonl"), CFG, tok)
    make = functools.partial(data.collate, cfg=CFG, tokenizer=tok)

    def batch(rank, step, rows):
        return pipeline.loader._BatchMaker([ds], make, len(rows), seed=0, rank=rank)[(step, 0, rows, [], None)]["batch"]
    a, other_rank, next_step, alone = batch(0, 5, [0, 1, 2, 3]), batch(1, 5, [0, 1, 2, 3]), batch(0, 6, [0, 1, 2, 3]), \
        batch(1, 5, [2])
    n = int(alone["text_attention"][0].sum())
    for k in ("video_mask", "audio_mask", "text_labels"):
        assert torch.equal(a[k], other_rank[k]) and not torch.equal(a[k], next_step[k]), k
    assert torch.equal(a["video_mask"][2], alone["video_mask"][0])
    assert torch.equal(a["text_labels"][2, :n], alone["text_labels"][0, :n])
    assert torch.equal(a["audio_mask"][2, :alone["audio_mask"].shape[1]], alone["audio_mask"][0])
    assert len({m.numpy().tobytes() for m in a["video_mask"]}) == 4


def test_caption_comes_first_and_the_transcript_is_cut(toy, tok, tmp_path):
    """Section 4.2.2: [CLS] caption [SEP] transcript [SEP]; a text longer than max_text_len loses the tail of
    the transcript, keeps the caption and ends with [SEP]."""
    caption, transcript = "a blue square", " ".join(["red circle moving left"] * 20)
    path = write_manifest(tmp_path / "long.jsonl",
                           [{"video": os.path.join(toy, "video", "000000.mp4"), "caption": caption, "text": transcript}])
    ids = pipeline.manifest.ManifestDataset(path, CFG, tok)[0]["text_ids"]
    cap = tok.tokenizer.encode(caption, add_special_tokens=False).ids
    words = tok.tokenizer.encode(transcript, add_special_tokens=False).ids
    assert len(words) > CFG.max_text_len
    n = CFG.max_text_len - len(cap) - 3
    assert ids == [tok.cls_id] + cap + [tok.sep_id] + words[:n] + [tok.sep_id]


def test_pad_to_max_fixes_the_shapes_and_keeps_the_content(toy, tok):
    """DataConfig.pad_to_max (train.py --compile): text padded to max_text_len and audio to max_audio_s whatever
    the batch holds, so every batch of a source has the same shapes; the real tokens and samples are those of
    the batch-maximum padding, and the padding is masked out and never selected for a loss."""
    import dataclasses
    fixed = dataclasses.replace(CFG, pad_to_max=True)
    ds = pipeline.manifest.ManifestDataset(os.path.join(toy, "speech_text.jsonl"), CFG, tok)
    exs = [dict(ds[i], audio=ds[i]["audio"][:n]) for i, n in enumerate((5000, 12000, 20000))]
    short = dict(exs[1], text_ids=tok.encode_one("red", max_len=CFG.max_text_len))
    for batch in (exs, [exs[0], short]):
        a = data.collate(batch, CFG, tok, torch.Generator().manual_seed(0))
        b = data.collate(batch, fixed, tok, torch.Generator().manual_seed(0))
        N, L = int(round(CFG.max_audio_s * CFG.sample_rate)), CFG.max_text_len
        assert a["audio"].shape[1] < N and a["text_ids"].shape[1] < L        # the batch-maximum shapes are smaller
        assert b["audio"].shape == (len(batch), N) and b["audio_mask"].shape == (len(batch), int(data.speech_frames(N)))
        assert b["text_ids"].shape == b["text_attention"].shape == b["text_labels"].shape == (len(batch), L)
        n, l = a["audio"].shape[1], a["text_ids"].shape[1]
        assert torch.equal(b["audio"][:, :n], a["audio"]) and not b["audio"][:, n:].any()
        assert torch.equal(b["audio_attention"][:, :n], a["audio_attention"]) and not b["audio_attention"][:, n:].any()
        assert torch.equal(b["text_ids_clean"][:, :l], a["text_ids_clean"]) and not b["text_attention"][:, l:].any()
        assert (b["text_labels"][:, l:] == -100).all() and not b["audio_mask"][:, int(data.speech_frames(n)):].any()
    with pytest.raises(ValueError, match="does not fit the padded length 4"):
        tok.pad([[1, 2, 3, 4, 5]], length=4)
    too_long = dict(exs[0], audio=np.zeros(N + 1, dtype=np.float32))
    with pytest.raises(ValueError, match="more than max_audio_s"):
        data.collate([too_long], fixed, tok)


def test_downstream_labels_pass_through(toy, tok):
    ds = pipeline.manifest.ManifestDataset(os.path.join(toy, "downstream_train.jsonl"), CFG, tok)
    b = data.collate([ds[0], ds[1], ds[2]], CFG, tok)
    lab = b["labels"]
    assert lab["score"].shape == (3,) and lab["emotions"].shape == (3, 6) and lab["label"].dtype == torch.long
    assert all(len(a) == 4 for a in lab["answers"]) and lab["answer"].max() < 4
    assert ((lab["score"] > 0).long() == lab["label"]).all() and lab["score"].abs().max() <= 3


def test_toy_labels_need_every_modality_and_questions_need_the_clip(toy_small):
    """The toy world's downstream rules (toy_world.json): the score adds the values of a colour (seen), a mood
    (said) and a judgement (written); the emotions are those three words' classes; the multiple-choice question
    asks for the shape's colour, which only the frames show, and its right answer is the colour behind the
    labels."""
    T = pipeline.toy
    V, colours = T.TOY_VALUES, list(T.TOY_COLOURS)
    with open(os.path.join(toy_small, "downstream_train.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    for r in rows:
        j = T.TOY_JUDGEMENTS.index(r["text"].split()[-1])                 # "the {shape} looks {judgement}"
        c = colours.index(r["answers"][r["answer"]])
        assert r["emotions"][j] == r["emotions"][c] == 1 and 1 <= sum(r["emotions"]) <= 3
        assert any(abs(r["score"] - V[j] - V[c] - V[m]) < 0.011 for m in range(6))   # + the said mood's value
        assert r["label"] == int(r["score"] > 0) and r["question"] == T.TOY_QUESTION
        assert set(r["answers"]) <= set(colours) and len(set(r["answers"])) == 4
        assert not any(w in r["text"].split() for w in colours)           # not in the text


def test_manifest_with_byte_order_mark(tmp_path):
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "first", "label": 1}).encode() + b"\n")
    assert list(pipeline.index.ManifestRows(str(p))) == [(1, {"text": "first", "label": 1})]


def test_malformed_labels_are_bad_rows(toy, tok, tmp_path):
    """A label the collator or eval.py cannot use is a bad row (reported by check, skipped in training),
    not a crash inside a DataLoader worker."""
    src = os.path.join(toy, "downstream_train.jsonl")
    lines = open(src).read().splitlines()
    rows = [json.loads(lines[i % len(lines)]) for i in range(8)]
    for r in rows:
        r["video"] = os.path.join(toy, r["video"])
    rows[1]["score"] = None
    rows[2]["emotions"] = rows[2]["emotions"][:3]
    rows[3]["label"] = "yes"
    rows[4]["answer"] = len(rows[4]["answers"])
    rows[5]["answers"] = "a b c"
    rows[6]["label"] = bool(rows[6]["label"])        # JSON true / false: a binary label, not a bad row
    path = write_manifest(tmp_path / "labels.jsonl", rows)
    lines = []  # check's messages
    assert pipeline.commands.check_manifest(path, CFG, tok, log=lines.append) == (8, 5)
    for line, reason in {2: "score must be a number", 3: "emotions has 3 entries", 4: "label must be a number",
                         5: "answer must be an index", 6: "answers must be"}.items():
        assert any(m.startswith(f"{path}:{line}: {reason}") for m in lines), (line, reason, lines)
    ds = pipeline.manifest.ManifestDataset(path, CFG, tok)
    b = data.collate([ds[0], ds[6], ds[7]], CFG, tok)
    assert b["labels"]["emotions"].shape == (3, 6) and b["labels"]["label"][1] == int(rows[6]["label"])
    # a manifest that is not UTF-8 is reported with its line, not a traceback
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    lines.clear()
    assert pipeline.commands.check_manifest(str(tmp_path / "latin1.jsonl"), CFG, tok, log=lines.append) == (1, 1)
    assert "cannot read the manifest" in lines[0] and "latin1.jsonl:1: not UTF-8 text" in lines[1]


# ----------------------------------------------------------------------------------------------------
# Offline VQ targets, the toy world, the command line

def test_target_cache_round_trip(toy, tok, tmp_path, monkeypatch):
    """`tokenize` writes a manifest's ids in shards (2 rows a shard here: 3 shards for 6 rows) that the loader
    reads back exactly; a row edited since gets its ids on the device (said once, by the loader); an interrupted
    run leaves a cache whose written rows are used and goes on where it stopped; other tokenizers start afresh."""
    monkeypatch.setattr(pipeline.targets, "SHARD_ROWS", 2)
    for f in ("video", "speech_text"):
        shutil.copytree(os.path.join(toy, f), tmp_path / f)
    path = shutil.copy(os.path.join(toy, "video.jsonl"), tmp_path / "v.jsonl")

    def quantize(batch):  # a stand-in tokenizer: ids from pixel and sample statistics
        v = batch["video"]
        ids = (v.mean(1).unfold(2, 16, 16).unfold(3, 16, 16).mean((-1, -2)) * 100).long().abs()
        a = batch["audio"].unfold(1, 400, 320)[:, :, :1].abs().mul(1000).long()
        return {"video_targets": ids, "audio_targets": a[:, :, 0]}

    written, bad = pipeline.targets.tokenize_manifest(str(path), CFG, quantize, batch_size=4, name="test")
    files = sorted(os.listdir(tmp_path / "v.targets"))
    assert (written, bad) == (6, 0) and files == ["meta.json"] + [f"shard-0000{k}.{f}.npy" for k in range(3)
                                                                  for f in ("audio", "key", "video")]
    ds = pipeline.manifest.ManifestDataset(str(path), CFG, tok)
    b = data.collate([ds[0], ds[3]], CFG, tok)
    ref = quantize(data.collate([ds[0], ds[3]], CFG, tok))
    assert torch.equal(b["video_targets"], ref["video_targets"])
    assert torch.equal(b["audio_targets"], ref["audio_targets"])
    assert pipeline.manifest.ManifestDataset(str(path), dataclasses.replace(CFG, frames=2), tok).targets is None
    # the manifest edited after `tokenize`: rows 1 and 2 swapped hold other clips than their ids were made
    # from, so they get no cached ids (the device makes them); row 3 keeps its own
    lines = open(path).read().splitlines()
    write_manifest(path, [lines[1], lines[0]] + lines[2:])
    ds = pipeline.manifest.ManifestDataset(str(path), CFG, tok)
    assert ["video_targets" in ds[i] for i in range(3)] == [False, False, True]
    assert [ds[i].get("stale_targets", False) for i in range(3)] == [True, True, False]
    # said once per manifest, by the loader's own process (a worker's print would break the progress bar)
    logs = []
    loader = data.make_loader([ds], [1.0], CFG, tok, batch_size=3, seed=0, log=logs.append)
    list(itertools.islice(loader, 4))
    assert len(logs) == 1 and "v.jsonl:" in logs[0] and "re-run `python -m pipeline tokenize`" in logs[0], logs
    # a re-run writes only the two edited rows
    assert pipeline.targets.tokenize_manifest(str(path), CFG, quantize, batch_size=4, name="test") == (2, 0)
    # an interrupted run of other tokenizers: their cache replaces this one; the rows it wrote are used, the
    # others are made on the device; the next run writes only those
    def fail_second(batch, calls=[]):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("pre-empted")
        return quantize(batch)
    with pytest.raises(RuntimeError, match="pre-empted"):
        pipeline.targets.tokenize_manifest(str(path), CFG, fail_second, batch_size=2, name="other")
    ds = pipeline.manifest.ManifestDataset(str(path), CFG, tok)
    assert ds.targets.meta["quantizer"] == "other"
    assert ["video_targets" in e for e in ds] == [True, True, False, False, False, False]
    assert not any(e.get("stale_targets") for e in ds)
    assert pipeline.targets.tokenize_manifest(str(path), CFG, fail_second, batch_size=2, name="other") == (4, 0)
    assert all("video_targets" in e for e in pipeline.manifest.ManifestDataset(str(path), CFG, tok))


def _tree_hash(root):
    h = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            h[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return h


def test_toy_world_is_deterministic(toy, tmp_path):
    pipeline.toy.make_toy(str(tmp_path / "again"), seed=0, size="tiny")
    pipeline.toy.make_toy(str(tmp_path / "other"), seed=1, size="tiny")
    a, b, c = _tree_hash(toy), _tree_hash(tmp_path / "again"), _tree_hash(tmp_path / "other")
    a = {k: v for k, v in a.items() if not k.startswith("combo")}
    a, b = ({k: v for k, v in h.items() if not k.endswith(".index.npy")} for h in (a, b))   # made when read
    assert a == b and len(a) > 40
    assert sum(a[k] != c.get(k) for k in a) > 40


def test_toy_world_reads_clean_and_carries_content(toy, tok):
    for name in ("video", "image_text", "speech_text", "video_speech", "video_test",
                 "downstream_train", "downstream_validation", "downstream_test"):
        rows, bad = pipeline.commands.check_manifest(os.path.join(toy, f"{name}.jsonl"), CFG, tok, log=lambda m: None)
        assert rows > 0 and bad == 0, name
    # the spoken words are audible: the same word said by two speakers correlates more than two words
    rng = np.random.default_rng(0)
    spec = lambda w: np.abs(np.fft.rfft(pipeline.toy.toy_speech([w], 16000, rng, 0.5)[0]))[:4000]
    red1, red2, blue = spec("red"), spec("red"), spec("blue")
    cos = lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    assert cos(red1, red2) > cos(red1, blue) + 0.1
    assert tok.pad_id == 0 and tok.tokenizer.encode("red circle").tokens == ["[CLS]", "red", "circle", "[SEP]"]


def test_cli_bench_and_make_toy(toy, capsys):
    assert pipeline.commands.main(["bench", os.path.join(toy, "video.jsonl"), "-n", "4", "--precut"]) == 0
    out = capsys.readouterr().out
    assert out.count("examples/s per core") == 2 and out.count("cores decoding at this rate") == 2   # and pre-cut
    # a bad first row is skipped like the others; a manifest with no good row ends with 1 and a reason
    good = json.loads(open(os.path.join(toy, "video.jsonl")).readline())
    good["video"] = os.path.join(toy, good["video"])
    bad = {"video": os.path.join(toy, "nothere.mp4"), "text": "x"}
    tok_arg = ["--tokenizer", os.path.join(toy, "tokenizer.json")]
    assert pipeline.commands.main(["bench", write_manifest(os.path.join(toy, "bench1.jsonl"), [bad, good]), "-n", "4"] + tok_arg) == 0
    assert "2 examples (2 bad)" in capsys.readouterr().out
    assert pipeline.commands.main(["bench", write_manifest(os.path.join(toy, "bench2.jsonl"), [bad, bad]), "-n", "2"] + tok_arg) == 1
    assert "no good row" in capsys.readouterr().err


def test_offline_targets_are_the_models_own(toy, tok, tmp_path):
    """`python -m pipeline tokenize --preset toy` writes exactly the ids the tiny model computes on the device
    (same tokenizers, same normalised waveform), and train.py refuses a cache made for another model."""
    import train
    from icode import ICode, preset
    shutil.copytree(os.path.join(toy, "video"), tmp_path / "video")
    path = shutil.copy(os.path.join(toy, "video.jsonl"), tmp_path / "v.jsonl")
    assert pipeline.commands.main(["tokenize", str(path), "--preset", "toy"]) == 0
    cached_ds = pipeline.manifest.ManifestDataset(str(path), CFG, tok)
    fresh_ds = pipeline.manifest.ManifestDataset(str(path), CFG, tok, use_targets=False)
    assert cached_ds.targets is not None and fresh_ds.targets is None
    cached = data.collate([cached_ds[i] for i in (0, 2, 3)], CFG, tok, torch.Generator().manual_seed(1))
    fresh = data.collate([fresh_ds[i] for i in (0, 2, 3)], CFG, tok, torch.Generator().manual_seed(1))
    assert "audio_targets" in cached and "audio_targets" not in fresh
    model = ICode(preset("tiny"))
    t_cached, t_fresh = model.targets(cached), model.targets(fresh)
    for k in ("video", "audio"):
        assert (t_fresh[k] != -100).any() and torch.equal(t_cached[k], t_fresh[k]), k
    train.check_target_caches([cached_ds, fresh_ds], model)
    for other in (dataclasses.replace(model.cfg, tokenizer_seed=1),    # same codebook sizes, other codes
                  dataclasses.replace(model.cfg, video_codebook=16)):
        with pytest.raises(ValueError, match=r"v\.targets: the target cache was written by tokenizers [0-9a-f]{16} "
                                             r"\(target tokenizers of the tiny model .*the model's are [0-9a-f]{16}"):
            train.check_target_caches([cached_ds], ICode(other))
    cached_ds.targets.meta = dict(cached_ds.targets.meta, tokenizers=None)   # a callable without a fingerprint
    with pytest.raises(ValueError, match="written by tokenizers None"):
        train.check_target_caches([cached_ds], model)


def test_precut_rows_read_back_as_the_same_examples(toy, tok, tmp_path, capsys):
    """`precut` decodes each row once at the clip shape: the new manifest's examples have the same text and
    labels, the same sound (a float WAV), frames within a few levels of the original's (one more H.264 pass at
    CRF 12), images as cropped JPEGs; a bad row is left out with its reason."""
    import shutil
    rows = [json.loads(line) for line in open(os.path.join(toy, "downstream_train.jsonl"))]
    rows = [{**r, "video": os.path.join(toy, r["video"])} for r in rows]
    path = write_manifest(tmp_path / "d.jsonl", rows[:3] + [{**rows[0], "video": "nothere.mp4"}])
    out = pipeline.precut.precut_manifest(path, str(tmp_path / "cut"), CFG, workers=2)
    assert "nothere.mp4" in capsys.readouterr().err
    a = pipeline.manifest.ManifestDataset(path, CFG, tok)
    b = pipeline.manifest.ManifestDataset(out, CFG, tok)
    assert len(b) == 3 and b.modalities == a.modalities
    for i in range(3):
        x, y = a[i], b[i]
        assert x["text_ids"] == y["text_ids"] and x["score"] == y["score"] and x["emotions"] == y["emotions"]
        assert np.array_equal(x["audio"], y["audio"])
        assert pipeline.precut.frames_difference(x["video"], y["video"]) < 3.0
    img = pipeline.precut.precut_manifest(os.path.join(toy, "image_text.jsonl"), str(tmp_path / "img"), CFG)
    c, d = pipeline.manifest.ManifestDataset(os.path.join(toy, "image_text.jsonl"), CFG, tok), \
        pipeline.manifest.ManifestDataset(img, CFG, tok)
    assert d[0]["static"] and pipeline.precut.frames_difference(c[0]["video"], d[0]["video"]) < 4.0
    shutil.rmtree(tmp_path / "cut")
