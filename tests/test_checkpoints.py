"""Checkpoints that survive: a damaged newest checkpoint is passed over, a run resumes on another number of
processes with the same samples and masks, and a checkpoint exports to a folder that loads for inference."""
import json
import os
import shutil
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

import icode
import train
import training.checkpoint
from icode import ICode


def _run(toy, out, *extra):
    return train.main(["--toy-dir", toy, "--out", str(out), "--workers", "0", "--no-eval", "--log-every", "1",
                       "--encoder-steps", "0", *extra])


def _losses(res):
    return [h["loss"] for h in res["history"]]


DAMAGE = {
    "truncated weights": lambda c: _truncate(c / "model.safetensors"),
    "truncated optimiser state": lambda c: _truncate(c / "optimizer.safetensors"),
    "garbage state.json": lambda c: (c / "state.json").write_text("{not json"),
    "a missing file": lambda c: os.remove(c / "rng_rank0.safetensors"),
}


def _truncate(path, n=1000):
    with open(path, "r+b") as f:
        f.truncate(n)


def test_a_damaged_newest_checkpoint_is_passed_over(toy_small, tmp_path, capsys):
    """Checkpoints at steps 2 and 4; step 4's damaged four ways: --resume says which file is wrong in one line,
    moves the folder aside, goes on from step 2 and finishes with the losses of a run resumed from step 2
    directly. With no intact checkpoint left it stops with one line, not a traceback."""
    args = ("--batch", "4", "--save-every", "2", "--steps")
    _run(toy_small, tmp_path / "run", *args, "4")
    ref = tmp_path / "ref"
    shutil.copytree(tmp_path / "run", ref)
    shutil.rmtree(ref / "ckpt_0000004")
    want = _losses(_run(toy_small, ref, *args, "6", "--resume"))
    capsys.readouterr()
    for name, damage in DAMAGE.items():
        out = tmp_path / name.replace(" ", "_")
        shutil.copytree(tmp_path / "run", out)
        damage(out / "ckpt_0000004")
        res = _run(toy_small, out, *args, "6", "--resume")
        said = capsys.readouterr().out
        assert res["step"] == 6 and _losses(res) == want, name
        assert "ckpt_0000004: " in said and "moved to ckpt_0000004.damaged" in said, said
        assert os.path.isdir(out / "ckpt_0000004.damaged") and f"resumed from {out}/ckpt_0000002" in said
        line = next(s for s in said.splitlines() if "ckpt_0000004: " in s)
        assert {"truncated weights": "model.safetensors has 1000 bytes, files.json says",
                "truncated optimiser state": "optimizer.safetensors has 1000 bytes",
                "garbage state.json": "state.json has 9 bytes",
                "a missing file": "rng_rank0.safetensors is missing"}[name] in line, line
    out = tmp_path / "all_damaged"
    shutil.copytree(tmp_path / "run", out)
    for c in ("ckpt_0000002", "ckpt_0000004"):
        _truncate(out / c / "model.safetensors")
    with pytest.raises(training.checkpoint.CheckpointError, match="no intact checkpoint in .*ckpt_0000004: "
                                                                  "model.safetensors has 1000 bytes"):
        _run(toy_small, out, *args, "6", "--resume")


def _recording_worker(rank, world, port, argv, out_dir):
    """train.main on one rank of `world` (gloo), recording each step's examples and masks."""
    if world > 1:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    records, real = [], train.train_step

    def recording_step(objective, ddp, mbs, d, autocast):
        for mb in mbs:
            records.append([_example_masks(mb, i) for i in range(len(mb["index"]))])
        return real(objective, ddp, mbs, d, autocast)
    train.train_step = recording_step
    try:
        res = train.main(argv)
    finally:
        train.train_step = real
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"records": records, "losses": _losses(res)}, f)
    if world > 1:
        dist.destroy_process_group()


def _example_masks(mb, i):
    """One example of a micro-batch: its row and where its three masks are (independent of padding)."""
    out = {"row": mb["index"][i]}
    if "video_mask" in mb:
        out["video"] = mb["video_mask"][i].flatten().nonzero().flatten().tolist()
    if "text_labels" in mb:
        lab = mb["text_labels"][i]
        out["text"] = [(int(k), int(lab[k])) for k in (lab != -100).nonzero().flatten()]
    if "audio_mask" in mb:
        out["audio"] = mb["audio_mask"][i].nonzero().flatten().tolist()
    return out


def _launch(world, argv, out_dir):
    """argv's run on `world` processes; returns [rank 0's {"records", "losses"}, ...]."""
    if world == 1:
        _recording_worker(0, 1, 0, argv, out_dir)
    else:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        mp.spawn(_recording_worker, args=(world, port, argv, out_dir), nprocs=world, join=True)
    return [json.loads(open(os.path.join(out_dir, f"rank{r}.json")).read()) for r in range(world)]


def _steps(ranks):
    """Per step, the examples of every rank in rank order (the global batch as one process sees it)."""
    return [sum((r["records"][k] for r in ranks), []) for k in range(len(ranks[0]["records"]))]


@pytest.mark.parametrize("first,then", [(2, 1), (1, 2)])
def test_resume_on_another_number_of_processes(toy_small, tmp_path, first, then):
    """World size 2 -> 1 and 1 -> 2 with the same global batch of 8 (tiny preset, no dropout): the resumed run
    trains on exactly the rows, with exactly the masks, of the uninterrupted run, and its losses agree to 1e-5."""
    base = ["--toy-dir", toy_small, "--workers", "0", "--no-eval", "--steps", "6", "--encoder-steps", "0"]
    one = _launch(1, base + ["--out", str(tmp_path / "one"), "--batch", "8"], str(tmp_path))
    a = _launch(first, base + ["--out", str(tmp_path / "run"), "--batch", str(8 // first), "--stop-at-step", "3"],
                str(tmp_path))
    b = _launch(then, base + ["--out", str(tmp_path / "run"), "--batch", str(8 // then), "--resume"], str(tmp_path))
    assert _steps(a) + _steps(b) == _steps(one)
    assert len(_steps(one)) == 6 and len({e["row"][1] for e in _steps(one)[0]}) == 8
    np.testing.assert_allclose(b[0]["losses"], one[0]["losses"], rtol=0, atol=1e-5)


def _loaded_state_worker(rank, world, port, argv, ckpt, out_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    checks, real = [], train.train_step

    def first_step(objective, ddp, mbs, d, autocast):
        if not checks:             # right after loading: the weights and AdamW state are the checkpoint's
            model = objective.model
            saved = load_file(os.path.join(ckpt, "model.safetensors"))
            own = {k: v for k, v in model.state_dict().items()}
            adam = load_file(os.path.join(ckpt, "optimizer.safetensors"))
            mine = training.checkpoint.optimizer_tensors(run_opt[0], model)
            checks.append(all(torch.equal(own[k], v) for k, v in saved.items()) and saved.keys() == own.keys()
                          and adam.keys() == mine.keys() and all(torch.equal(adam[k], mine[k]) for k in adam))
        for mb in mbs:
            checks.append([e[1] for e in mb["index"]])
        return real(objective, ddp, mbs, d, autocast)
    run_opt, real_build = [], train.build_optimizer

    def build(*a, **k):
        run_opt.append(real_build(*a, **k))
        return run_opt[-1]
    train.train_step, train.build_optimizer = first_step, build
    try:
        train.main(argv)
    finally:
        train.train_step, train.build_optimizer = real, real_build
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(checks, f)
    dist.destroy_process_group()


def test_resume_with_another_global_batch(toy_small, tmp_path, capsys):
    """One source of 64 rows: 3 steps of 4 rows, then resumed on 2 processes with 3 rows each (a global batch
    of 6): right after loading every rank holds the checkpoint's weights and AdamW state, it says what changed,
    and over the rest of the epoch no row is taken twice and none is skipped (the 4-row tail is dropped)."""
    tok = os.path.join(toy_small, "tokenizer.json")
    manifest = os.path.join(toy_small, "image_text.jsonl")
    base = ["--data", manifest, "--tokenizer", tok, "--workers", "0", "--no-eval", "--out", str(tmp_path / "run")]
    first = _launch(1, base + ["--batch", "4", "--steps", "3"], str(tmp_path))
    rows = [e["row"][1] for step in _steps(first) for e in step]
    ckpt = training.checkpoint.checkpoints(str(tmp_path / "run"))[-1]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = base + ["--batch", "3", "--steps", "12", "--resume"]
    mp.spawn(_loaded_state_worker, args=(2, port, argv, ckpt, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads(open(tmp_path / f"rank{r}.json").read()) for r in range(2)]
    assert ranks[0][0] is True and ranks[1][0] is True
    steps = list(zip(ranks[0][1:], ranks[1][1:]))                  # 9 steps of 3 + 3 rows
    rows += [row for a, b in steps[:8] for row in a + b]           # the rest of epoch 0: 8 steps of 6
    assert len(rows) == len(set(rows)) == 12 + 48 == 64 - 4
    nxt = steps[8][0] + steps[8][1]                                  # step 12: epoch 1 has begun
    assert len(set(nxt)) == 6


def test_export_writes_a_folder_that_loads_for_inference(toy_small, tmp_path):
    """`python icode.py export CKPT OUT`: config.json + model.safetensors, no training state, loading through
    ICode.from_checkpoint as the checkpoint itself does: the same weights, the same representations."""
    _run(toy_small, tmp_path / "run", "--batch", "4", "--steps", "2")
    ckpt = training.checkpoint.checkpoints(str(tmp_path / "run"))[-1]
    icode.main(["export", ckpt, str(tmp_path / "export")])
    assert sorted(os.listdir(tmp_path / "export")) == ["config.json", "model.safetensors"]
    a, b = ICode.from_checkpoint(ckpt), ICode.from_checkpoint(str(tmp_path / "export"))
    assert not a.training and not b.training and a.cfg == b.cfg
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    text = torch.randint(5, 100, (2, 7))
    torch.testing.assert_close(a.encode(text=text).joint, b.encode(text=text).joint, rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="neither config.json nor state.json"):
        ICode.from_checkpoint(str(tmp_path))


def test_stage_one_writes_public_folders_that_the_run_loads(toy_small, tmp_path, monkeypatch):
    """`python train.py` on the toy world starts from stage one's encoders: each pretrained alone with its
    masked-unit objective (their losses fall), written as public folders (DeBERTa-V2, WavLM, swin3d layouts)
    that model.load_encoder reads back exactly, and loaded by the run through the same path as public ones;
    a second run reuses them."""
    import data as D
    from model import load_encoder, vision_kind
    from pipeline.text import load_tokenizer
    from training.encoders import SingleModalityPretraining, pretrain_encoders
    tok = load_tokenizer(os.path.join(toy_small, "tokenizer.json"))
    manifests = [os.path.join(toy_small, f) for f in train.TOY_PRETRAIN]
    seen, real = [], SingleModalityPretraining.forward
    monkeypatch.setattr(SingleModalityPretraining, "forward", lambda self, b: seen.append(real(self, b)) or seen[-1])
    folders = pretrain_encoders(icode.preset("tiny", text_vocab=tok.vocab_size), manifests, tok, D.TOY_DATA,
                                str(tmp_path / "enc"), steps=30, batch=8, log=lambda m: None)
    for m in ("text", "video", "audio"):        # each objective learns something in 30 steps
        vals = [s[m].item() for s in seen if m in s]
        assert sum(vals[-4:]) / 4 < sum(vals[:4]) / 4, (m, vals)
    assert vision_kind(folders["video"]) == "video-swin"
    loaded = {"text": load_encoder("deberta-v3", folders["text"]), "video": load_encoder("video-swin", folders["video"]),
              "audio": load_encoder("wavlm", folders["audio"])}
    calls = []
    real_with = train.with_encoders
    monkeypatch.setattr(train, "with_encoders", lambda *a, **k: calls.append(a[1:4]) or real_with(*a, **k))
    res = train.main(["--toy-dir", toy_small, "--out", str(tmp_path / "run"), "--workers", "0", "--no-eval",
                      "--steps", "1", "--batch", "4", "--toy-encoders", str(tmp_path / "enc"), "--lr-encoders", "0"])
    assert res["step"] == 1 and calls == [(folders["text"], folders["video"], folders["audio"])]
    model = ICode.from_checkpoint(training.checkpoint.checkpoints(str(tmp_path / "run"))[-1])
    for m, attr in (("text", "text"), ("video", "vision"), ("audio", "speech")):   # LR 0: still stage one's
        ours = getattr(model, attr).state_dict()
        assert all(torch.equal(v, ours[k]) for k, v in loaded[m].state_dict().items()), m
