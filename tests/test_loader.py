"""pipeline/sampler.py and pipeline/loader.py: mixing sources, sharding across ranks, exact resume, bad rows
skipped, counted and stopping the run; workers and the job's stop signals.
"""
import dataclasses
import itertools
import json
import os
import shutil

import numpy as np
import pytest
import torch
from common import grey_clip, write_manifest

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
# Bad rows: check reports them, the loader skips and counts them, too many stop training

@pytest.fixture()
def bad_manifest(toy, tmp_path):
    good = os.path.join(toy, "video", "000000.mp4")
    shutil.copy(good, tmp_path / "good.mp4")
    (tmp_path / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    (tmp_path / "empty.mp4").write_bytes(b"")
    raw = open(good, "rb").read()
    (tmp_path / "trunc.mp4").write_bytes(raw[:len(raw) // 2])
    grey_clip(tmp_path / "noaudio.mp4", n=10)
    g = {"video": "good.mp4", "text": "a red circle"}
    rows = [g, {"video": "nothere.mp4", "text": "x"}, {"video": "corrupt.mp4", "text": "x"},
            {"video": "empty.mp4", "text": "x"}, {"video": "trunc.mp4", "text": "x"}, {"video": "good.mp4", "text": "  "},
            {"video": "good.mp4", "text": "x", "colour": "red"}, "{not json", {"video": "noaudio.mp4", "text": "x"},
            {"video": "good.mp4", "text": "y", "start": 3.0, "end": 4.0},
            {"video": "good.mp4", "text": "z", "mute": "no"}]
    rows += [g] * 9
    expected = {2: "missing file", 3: "undecodable video", 4: "empty file", 5: "undecodable video", 6: "empty text",
                7: "unknown field", 8: "invalid JSON", 9: "no audio stream", 10: "clip starts",
                11: "mute must be true or false"}
    return write_manifest(tmp_path / "mixed.jsonl", rows), expected


def test_check_reports_each_bad_row(bad_manifest, tok):
    path, expected = bad_manifest
    lines = []
    rows, bad = pipeline.commands.check_manifest(path, CFG, tok, log=lines.append)
    assert (rows, bad) == (20, len(expected))
    for line, reason in expected.items():
        assert any(m.startswith(f"{path}:{line}: {reason}") for m in lines), (line, reason, lines)
    assert "20 rows, 10 bad" in lines[-1]
    assert pipeline.commands.main(["check", path]) == 1


def test_a_mute_that_is_not_a_boolean_decides_nothing(toy, tmp_path):
    """"mute": "false" (a string) is a bad row, and as a manifest's first row it does not mute the manifest
    (it would have dropped the audio of every row: any non-empty string is truthy); only JSON true mutes."""
    v = os.path.join(toy, "video", "000000.mp4")
    rows = [{"video": v, "text": "a", "mute": "false"}, {"video": v, "text": "b"}]
    path = write_manifest(tmp_path / "mute.jsonl", rows)
    ds = pipeline.manifest.ManifestDataset(path, CFG)
    assert ds.modalities == ("video", "text", "audio")
    with pytest.raises(pipeline.media.BadExample, match="mute must be true or false, got 'false'"):
        ds[0]
    assert "audio" in ds[1]


def test_loader_skips_and_counts_bad_rows(bad_manifest, tok):
    path, expected = bad_manifest
    cfg = dataclasses.replace(CFG, max_bad_share=0.9)
    logs = []
    loader = data.make_loader([path], [1.0], cfg, tok, batch_size=4, seed=3, spares=0, log=logs.append)
    it = iter(loader)
    seen = [line for _ in range(5) for _, line in next(it)["index"]]  # one epoch: 5 batches of 4 rows
    assert loader.tried_counts["mixed"] == 20
    skipped = 20 - len(seen)
    assert skipped == len(expected) and sorted(seen) == [1] + list(range(12, 21))
    assert loader.bad_counts["mixed"] == skipped and not set(seen) & set(expected)
    assert sum(loader.bad_reasons["mixed"].values()) == skipped
    assert len(logs) == min(skipped, 5) and all("mixed.jsonl:" in m for m in logs)
    assert loader.bad_report().startswith(f"data: {path}: {skipped} of 20 rows tried were bad and skipped; reasons {{")
    # spares fill the batch in place of bad rows
    loader = data.make_loader([path], [1.0], cfg, tok, batch_size=4, seed=3, spares=6, log=logs.append)
    sizes = [len(next(iter(loader))["index"])]
    assert sizes == [4]
    # the default 10% share stops training with the manifest's name
    loader = data.make_loader([path], [1.0], CFG, tok, batch_size=4, seed=3, log=logs.append)
    with pytest.raises(pipeline.loader.TooManyBadExamples, match="mixed.jsonl"):
        for _ in itertools.islice(loader, 50):  # 10 of 20 rows are bad: stops within the first epoch or two
            pass


def test_loader_state_keeps_the_bad_row_accounts(bad_manifest, tok):
    """A resumed run goes on counting bad rows where the first left off (the final report sees the whole run),
    through a JSON round trip as in a checkpoint; its max_bad_share stop judges the rows tried since the resume."""
    path, expected = bad_manifest
    cfg = dataclasses.replace(CFG, max_bad_share=0.9)
    loader = data.make_loader([path], [1.0], cfg, tok, batch_size=4, seed=3, spares=0, log=lambda m: None)
    it = iter(loader)
    for _ in range(3):
        next(it)
    assert loader.bad_counts["mixed"] > 0
    again = data.make_loader([path], [1.0], cfg, tok, batch_size=4, seed=3, spares=0, log=lambda m: None)
    again.load_state_dict(json.loads(json.dumps(loader.state_dict())))
    assert again.bad_counts == loader.bad_counts and again.tried_counts == loader.tried_counts
    assert again.bad_reasons == loader.bad_reasons
    assert loader.since_start["mixed"] == (loader.bad_counts["mixed"], loader.tried_counts["mixed"])
    assert again.since_start == {"mixed": (0, 0)}


def test_a_small_all_bad_source_stops_once_every_row_is_tried(tmp_path, tok):
    """min_tried (50) is capped by the source's size: 6 rows, all bad, stop after the 6 tried (3 batches of 2),
    not after 50 (25 batches)."""
    path = write_manifest(tmp_path / "allbad.jsonl", [{"video": "nothere.mp4", "text": "x"}] * 6)
    loader = data.make_loader([path], [1.0], CFG, tok, batch_size=2, seed=0, spares=0, log=lambda m: None)
    batches = 0
    with pytest.raises(pipeline.loader.TooManyBadExamples, match="6 of the 6 rows tried since this run started or resumed were bad"):
        for _ in itertools.islice(loader, 30):
            batches += 1
    # the stopping batch is not counted: the counters (and a checkpoint saved at the stop) are those after the
    # last batch handed out, so a run resumed on repaired rows does not start beyond the limit
    assert batches == 2 and loader.tried_counts["allbad"] == loader.bad_counts["allbad"] == 4
    assert loader.state_dict()["sampler"]["step"] == 2
    assert loader.bad_report() == (f"data: {path}: 4 of 4 rows tried were bad and skipped; "
                                   f"reasons {{'missing file': 4}}")


# ----------------------------------------------------------------------------------------------------
# Mixing: same source on every rank, disjoint shards, exact resume

def test_sampler_same_source_disjoint_and_resumes():
    sizes, weights, W, bs = [10, 7, 23], [1, 2, 1], 3, 2
    G = W * bs
    samplers = [pipeline.sampler.MixedBatchSampler(sizes, weights, bs, r, W, seed=5, spares=2, names="abc") for r in range(W)]
    plans = [[s.next_plan() for _ in range(60)] for s in samplers]
    per_source = {k: [] for k in range(3)}           # the step's G rows, ranks in order
    for step in range(60):
        srcs = {p[step][1] for p in plans}
        assert len(srcs) == 1  # every rank, same source
        rows = [set(p[step][2]) for p in plans]
        assert not (rows[0] & rows[1] or rows[0] & rows[2] or rows[1] & rows[2])
        per_source[plans[0][step][1]] += [row for r in range(W) for row in plans[r][step][2]]
        for r in range(W):
            spares = plans[r][step][3]  # distinct rows of the epoch, none of them in the step's G rows
            assert len(set(spares)) == len(spares) == min(2, sizes[plans[r][step][1]] - G)
            assert all(sp not in plans[q][step][2] for q in range(W) for sp in spares)
    assert {p[1] for p in plans[0]} == {0, 1, 2}
    for k, n in enumerate(sizes):  # within every epoch, all rows of all ranks are distinct
        m = n // G * G  # rows per epoch (an incomplete last global batch is dropped)
        epochs = len(per_source[k]) // m
        assert epochs >= 2, (k, epochs)
        for e in range(epochs):
            rows = per_source[k][e * m:(e + 1) * m]
            assert len(set(rows)) == len(rows) == m, (k, e)
        # reshuffled each epoch (seeded by the epoch): the epochs do not walk the rows in one order
        assert len({tuple(per_source[k][e * m:(e + 1) * m]) for e in range(epochs)}) > 1, k
    # the rows of a step depend on the global batch alone: one process with batch 6 takes the 3 ranks' rows
    one = pipeline.sampler.MixedBatchSampler(sizes, weights, G, 0, 1, seed=5, spares=2, names="abc")
    assert [one.next_plan()[2] for _ in range(60)] == [sum((p[step][2] for p in plans), []) for step in range(60)]
    # resume: a fresh sampler loaded from a JSON round trip of step 25's state continues identically, on this
    # number of processes or another (the state is the same on every rank)
    s = pipeline.sampler.MixedBatchSampler(sizes, weights, bs, 1, W, seed=5, spares=2, names="abc")
    for _ in range(25):
        s.next_plan()
    state = json.loads(json.dumps(s.state_dict()))
    s2 = pipeline.sampler.MixedBatchSampler(sizes, weights, bs, 1, W, seed=5, spares=2, names="abc")
    s2.load_state_dict(state)
    assert [s2.next_plan() for _ in range(35)] == plans[1][25:]
    s1 = pipeline.sampler.MixedBatchSampler(sizes, weights, G, 0, 1, seed=5, spares=2, names="abc")
    s1.load_state_dict(state)
    assert [s1.next_plan()[2] for _ in range(35)] == [sum((p[step][2] for p in plans), []) for step in range(25, 60)]


def test_another_global_batch_goes_on_from_each_sources_position():
    """Resumed with another global batch (4 -> 6 rows a step), every source continues where its epoch stood: over
    the rest of the epoch no row is taken twice and none is skipped but the dropped tail (fewer than 6 left)."""
    n = 23
    a = pipeline.sampler.MixedBatchSampler([n], [1], 2, rank=0, world_size=2, seed=1, spares=0)
    b = pipeline.sampler.MixedBatchSampler([n], [1], 2, rank=1, world_size=2, seed=1, spares=0)
    taken = []
    for _ in range(3):                                          # 12 rows of epoch 0
        taken += a.next_plan()[2] + b.next_plan()[2]
    state = json.loads(json.dumps(a.state_dict()))
    c = pipeline.sampler.MixedBatchSampler([n], [1], 3, rank=0, world_size=2, seed=1, spares=0)
    d = pipeline.sampler.MixedBatchSampler([n], [1], 3, rank=1, world_size=2, seed=1, spares=0)
    c.load_state_dict(state)
    d.load_state_dict(state)
    while c.epoch["0"] == 0 and c.pos["0"] + 6 <= n:            # the rest of epoch 0 in steps of 6
        taken += c.next_plan()[2] + d.next_plan()[2]
    assert len(taken) == len(set(taken)) == 12 + (n - 12) // 6 * 6     # 12 + 6: the last 5 rows are the tail
    assert set(taken) == set(pipeline.sampler.Permutation(n, (1, 0, 0))(np.arange(len(taken))).tolist())


def test_sampler_follows_the_weights_and_refuses_what_it_cannot_do():
    s = pipeline.sampler.MixedBatchSampler([50, 50, 50], [0.8, 0.2, 0.0], 4, seed=1)
    counts = np.bincount([s.source_at(k) for k in range(2000)], minlength=3)
    assert abs(counts[0] / 2000 - 0.8) < 0.04 and counts[2] == 0, counts    # std of a share ~0.009
    with pytest.raises(ValueError, match="source 0 has 10 rows, fewer than batch_size x world_size"):
        pipeline.sampler.MixedBatchSampler([10], [1], 4, rank=0, world_size=4)          # 2 rows per rank for batches of 4
    state = pipeline.sampler.MixedBatchSampler([40], [1], 2, rank=0, world_size=2, seed=3).state_dict()
    with pytest.raises(ValueError, match="cannot resume"):                  # other permutations
        pipeline.sampler.MixedBatchSampler([40], [1], 2, rank=0, world_size=2, seed=4).load_state_dict(state)


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_resumes_with_the_exact_next_batch(toy, tok, workers):
    ms = [os.path.join(toy, f"{n}.jsonl") for n in ("video", "image_text", "speech_text")]
    loader = data.make_loader(ms, [1, 1, 1], CFG, tok, batch_size=2, rank=0, world_size=2, seed=7, num_workers=workers)
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(loader.state_dict()))
    want = [next(it) for _ in range(2)]
    again = data.make_loader(ms, [1, 1, 1], CFG, tok, batch_size=2, rank=0, world_size=2, seed=7, num_workers=workers)
    again.load_state_dict(state)
    it2 = iter(again)
    got = [next(it2) for _ in range(2)]
    for a, b in zip(want, got):
        assert a["index"] == b["index"] and a["step"] == b["step"]
        for k, v in a.items():
            if torch.is_tensor(v):
                assert torch.equal(v, b[k]), k


def test_worker_loader_leaves_the_global_generator_alone(toy, tok):
    """Starting worker processes must not draw from torch's global generator: a resumed run restores it
    from the checkpoint and then starts its loader, an uninterrupted one started it at step 0, and every
    later draw (dropout, stochastic depth) would differ between the two."""
    ms = [os.path.join(toy, "image_text.jsonl")]
    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    next(iter(data.make_loader(ms, [1], CFG, tok, batch_size=2, seed=7, num_workers=1)))
    assert torch.equal(torch.rand(3), want)


STOP_SCRIPT = """
import os, signal, subprocess, sys
sys.path.insert(0, {root!r})
import data
import pipeline.text
stop = []
signal.signal(signal.SIGTERM, lambda s, f: stop.append(s))
tok = pipeline.text.load_tokenizer({tok!r})
it = iter(data.make_loader([{manifest!r}], [1], data.TOY_DATA, tok, batch_size=2, seed=0, num_workers=1))
next(it)
os.killpg(os.getpgid(0), signal.SIGTERM)    # what torchrun and `kill -- -PGID` do
subprocess.run(["pkill", "-TERM", "-P", str(os.getpid())], check=True)  # Slurm: every process (the worker)
batches = [next(it) for _ in range(3)]       # the trainer finishes its step and saves: the worker still serves
print("stopped by", stop, "then", len(batches), "batches")
# and exits with the loader still open: its own SIGTERM to the worker (multiprocessing's exit) must end it
"""


def test_workers_survive_the_stop_signal_of_the_job(toy, tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "stop.py"
    script.write_text(STOP_SCRIPT.format(root=root, tok=os.path.join(toy, "tokenizer.json"),
                                         manifest=os.path.join(toy, "image_text.jsonl")))
    import subprocess
    import sys
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                       start_new_session=True)  # its own process group, which it signals whole
    assert r.returncode == 0 and "stopped by [15] then 3 batches" in r.stdout, r.stderr[-2000:]


def test_all_bad_plan_yields_an_empty_batch(tmp_path, tok):
    """A plan whose rows and spares are all bad still yields (an empty batch with its step), so every rank
    stays on the same step; train.common_batch then skips it everywhere."""
    path = write_manifest(tmp_path / "allbad.jsonl", [{"video": "nothere.mp4", "text": "x"}] * 8)
    cfg = dataclasses.replace(CFG, max_bad_share=1.0)
    loader = data.make_loader([path], [1.0], cfg, tok, batch_size=4, seed=0, spares=1, log=lambda m: None)
    out = list(itertools.islice(loader, 3))
    assert [(b.get("empty"), b["step"], b["index"], b["source"]) for b in out] == [(True, k, [], "allbad") for k in range(3)]
    assert loader.tried_counts["allbad"] == loader.bad_counts["allbad"] == 3 * 5
