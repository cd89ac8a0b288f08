"""eval.py beyond the metrics: the joint representation, the multiple-choice head, text joining, GLUE
reading, and fine-tuning smoke runs on the smallest toy world (CPU, well under a minute)."""
import json
import math
import os

import pytest
import torch
from common import with_dropout

import data as D
import eval as E
import evaluation.glue
import evaluation.metrics
import evaluation.retrieval
import evaluation.rows
import pipeline.index
import pipeline.manifest
import pipeline.text
import pipeline.toy
import training.checkpoint
import training.distributed
from icode import ICode, preset


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model runs fastest on one thread; with 2 threads on a busy 2-core machine (other jobs beside
    pytest) OpenMP's waiting threads made this file 15x slower. Restored afterwards for the other test files."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    pipeline.toy.make_toy(str(root), size="tiny")
    return str(root)


@pytest.fixture(scope="module")
def tok(toy):
    return pipeline.text.load_tokenizer(os.path.join(toy, "tokenizer.json"))


def tiny_icode(vocab, fusion="merge", seed=0):
    torch.manual_seed(seed)
    return ICode(preset("tiny", fusion, text_vocab=vocab)).eval()


def test_parse_modalities():
    assert E.parse_modalities("V,L,S") == ("video", "text", "audio")
    assert E.parse_modalities("s, v") == ("video", "audio")             # any order, MODALITIES order out
    assert E.parse_modalities("text") == ("text",)
    for bad in ("", "V,X", ","):
        with pytest.raises(ValueError):
            E.parse_modalities(bad)


@pytest.mark.parametrize("fusion", ["merge", "co"])
def test_joint_representation_is_icode_encode_joint(fusion):
    """Same rule as ICode.encode: per-modality means over valid tokens, then an equal-weight mean; padding
    (text and audio here) must not change it."""
    m = tiny_icode(100, fusion)
    torch.manual_seed(1)
    video, audio = torch.randn(2, 3, 4, 64, 64), torch.randn(2, 3200)
    text = torch.randint(5, 100, (2, 7))
    att = torch.ones(2, 7, dtype=torch.bool)
    att[1, 4:] = False
    a_att = torch.ones(2, 3200, dtype=torch.bool)
    a_att[0, 2000:] = False
    with torch.no_grad():
        ref = m.encode(video=video, text=text, audio=audio, text_attention=att, audio_attention=a_att)
        feats, valids = m.encode_modalities(video=video, text=text, audio=audio, text_attention=att,
                                            audio_attention=a_att)
        mine = E.joint_representation(m.fusion(feats, valids), valids)
        # by hand: each modality's masked mean, then the mean of the three
        toks = m.fusion(feats, valids)
        hand = []
        for mod in ("video", "text", "audio"):
            x, v = toks[mod], valids[mod]
            hand.append(x.mean(1) if v is None else (x * v[..., None]).sum(1) / v.sum(1, keepdim=True))
        hand = torch.stack(hand).mean(0)
    assert torch.allclose(mine, ref.joint, atol=1e-6)
    assert torch.allclose(mine, hand, atol=1e-5)


def _mc_inputs(tok, n_q=3, K=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(n_q, 3, 4, 64, 64, generator=g)
    audio = torch.randn(n_q, 3200, generator=g)
    texts = [E.join_segments(tok, [f"what colour {q}?", f"answer {k} red blue", "the circle looks good"], 32)
             for q in range(n_q) for k in range(K)]
    ids, att = tok.pad(texts)
    return {"video": video, "audio": audio, "audio_attention": torch.ones(n_q, 3200, dtype=torch.bool),
            "text": ids, "text_attention": att}


def test_multiple_choice_softmax_is_per_question(tok):
    """[B*K] candidate rows -> logits [B, K]; the softmax runs over the K candidates of one question: permuting
    the questions in the batch permutes the rows of the probabilities and changes nothing else."""
    K = 4
    ft = E.FineTuner(tiny_icode(tok.vocab_size), "mc", 1, ("video", "text", "audio")).eval()
    inp = _mc_inputs(tok, n_q=3, K=K)
    with torch.no_grad():
        logits = ft(inp, n_candidates=K)
    assert logits.shape == (3, K)
    probs = logits.softmax(1)
    assert torch.allclose(probs.sum(1), torch.ones(3))
    perm = torch.tensor([2, 0, 1])
    rows = (perm[:, None] * K + torch.arange(K)).reshape(-1)          # the candidates travel with their question
    inp_p = {"video": inp["video"][perm], "audio": inp["audio"][perm], "audio_attention": inp["audio_attention"][perm],
             "text": inp["text"][rows], "text_attention": inp["text_attention"][rows]}
    with torch.no_grad():
        probs_p = ft(inp_p, n_candidates=K).softmax(1)
    assert torch.allclose(probs_p, probs[perm], atol=1e-5)
    # a question alone in its batch gets the same probabilities as inside the batch
    one = {k: v[:1] if k in ("video", "audio", "audio_attention") else v[:K] for k, v in inp.items()}
    with torch.no_grad():
        assert torch.allclose(ft(one, n_candidates=K).softmax(1), probs[:1], atol=1e-5)
    # the loss is the mean over questions of -log p(right candidate | that question's candidates)
    target = torch.tensor([1, 3, 0])
    hand = -sum(math.log(probs[i, target[i]].item()) for i in range(3)) / 3
    assert E.loss_fn("mc", logits, target).item() == pytest.approx(hand, rel=1e-5)


def test_join_segments_truncates_the_last_segment(tok):
    ids = E.join_segments(tok, ["what colour is it?", "red", "the circle looks good"], 64)
    assert ids[0] == tok.cls_id and ids[-1] == tok.sep_id
    assert ids.count(tok.sep_id) == 3                                   # [CLS] q [SEP] a [SEP] subtitles [SEP]
    short = E.join_segments(tok, ["what colour is it?", "red", "the circle looks good " * 20], 16)
    assert len(short) == 16 and short[-1] == tok.sep_id and short.count(tok.sep_id) == 3
    head = ids[:[i for i, x in enumerate(ids) if x == tok.sep_id][1] + 1]   # [CLS] question [SEP] answer [SEP]
    assert short[:len(head)] == head                                     # question and answer kept whole


def test_join_segments_keeps_the_candidate_after_a_long_question(tok):
    q, sub = "which feeling does the voice say " * 4, "the square looks bad"
    rows = [E.join_segments(tok, [q, a, sub], 12) for a in ("sad", "angry")]
    assert rows[0] != rows[1] and all(len(r) == 12 and r.count(tok.sep_id) == 3 for r in rows)
    for r, a in zip(rows, ("sad", "angry")):  # the candidate whole, between the 1st and 2nd [SEP]
        seps = [i for i, x in enumerate(r) if x == tok.sep_id]
        assert r[seps[0] + 1:seps[1]] == tok.tokenizer.encode(a, add_special_tokens=False).ids


def test_predictions_and_losses_per_task_by_hand():
    lg = torch.tensor([[-0.1, 0.2, 0.0, 3.0]])
    assert torch.equal(E.predict("emotion", lg), torch.tensor([[0.0, 1.0, 0.0, 1.0]]))   # sigmoid > 0.5
    assert torch.equal(E.predict("mc", lg), torch.tensor([3])) and torch.equal(E.predict("binary", lg[:, :2]), torch.tensor([1]))
    assert torch.equal(E.predict("sentiment", torch.tensor([[0.7], [-2.0]])), torch.tensor([0.7, -2.0]))
    y = torch.tensor([1.0, -1.0])
    assert E.loss_fn("sentiment", torch.tensor([[0.5], [0.0]]), y).item() == pytest.approx((0.5 + 1.0) / 2)
    t = torch.tensor([[0.0, 1.0, 0.0, 1.0]])
    bce = -sum(math.log(1 / (1 + math.exp(-z))) if y else math.log(1 - 1 / (1 + math.exp(-z)))
               for z, y in zip(lg[0].tolist(), t[0].tolist())) / 4
    assert E.loss_fn("emotion", lg, t).item() == pytest.approx(bce, rel=1e-5)
    ce = -math.log(math.exp(3.0) / sum(math.exp(z) for z in lg[0].tolist()))
    assert E.loss_fn("mc", lg, torch.tensor([3])).item() == pytest.approx(ce, rel=1e-5)
    assert E.loss_fn("glue", torch.tensor([[2.0]]), torch.tensor([3.5])).item() == pytest.approx(2.25)  # STS-B: MSE


def test_targets_and_candidate_counts_are_checked():
    assert E.target_of([{"label": 1.0}, {"label": 0}], "binary").dtype == torch.long   # 1.0 is class 1
    with pytest.raises(ValueError, match="0 or 1"):
        E.target_of([{"label": 0.5}], "binary")
    assert E.target_of([{"emotions": [0, 1.0, 0]}], "emotion").tolist() == [[0.0, 1.0, 0.0]]
    with pytest.raises(ValueError, match=r"0 or 1 per class, got \[0.33, 2\]"):   # MOSEI's raw intensities
        E.target_of([{"emotions": [0, 0.33, 2]}, {"emotions": [1, 0, 0]}], "emotion")
    items = [{"feats": {"text": [torch.zeros(3, 4)] * k}, "ex": {"answer": 0}, "K": k} for k in (3, 2, 4)]
    with pytest.raises(ValueError, match="same number of candidates"):   # 9 rows would also view as 3 x 3
        E.collate_features(items, "mc", ("text",))


def _splits(toy, tok):
    return {s: pipeline.manifest.load_examples(os.path.join(toy, f"downstream_{s}.jsonl"), D.TOY_DATA, tok)
            for s in ("train", "validation", "test")}


def _finetune_kw(tok, **kw):
    return dict(dict(ckpt=None, fusion="merge", modalities=("video", "text", "audio"), seed=0, dcfg=D.TOY_DATA,
                     tokenizer=tok, d=training.distributed.setup_distributed("cpu"), epochs=2, batch_size=4, log=lambda m: None), **kw)


def test_finetune_is_the_same_with_a_filled_feature_cache(toy, tok):
    """The second run finds the encoder outputs cached (no encoding, no random draws for it) and must still
    train exactly like the first; and modalities the manifests lack are an error, not a silent subset."""
    splits, kw = _splits(toy, tok), _finetune_kw(tok)
    cache = {}
    a = E.finetune("sentiment", splits, feature_cache=cache, **kw)
    b = E.finetune("sentiment", splits, feature_cache=cache, **kw)
    assert a["test"] == b["test"]
    # a fresh initialisation's features depend on its seed: seed 1 beside seed 0's cache = seed 1 alone
    c = E.finetune("sentiment", splits, feature_cache=cache, **dict(kw, seed=1))
    assert c["test"] == E.finetune("sentiment", splits, feature_cache={}, **dict(kw, seed=1))["test"] != a["test"]
    # an ablation uses only its modalities, whatever else the cache holds (text features from the runs above):
    # V+S on examples with text = V+S on the same examples without it
    vs = dict(kw, modalities=("video", "audio"))
    no_text = {s: [dict(e, modalities=("video", "audio")) for e in v] for s, v in splits.items()}
    assert E.finetune("sentiment", splits, feature_cache=cache, **vs)["test"] == \
        E.finetune("sentiment", no_text, feature_cache={}, **vs)["test"]
    # encoders with a learning rate are trained (no cache): another result than frozen encoders
    assert E.finetune("sentiment", splits, lr_encoders=1e-2, **kw)["test"] != a["test"]
    mute = {s: [dict(e, modalities=("video", "text")) for e in v] for s, v in splits.items()}
    with pytest.raises(ValueError, match=r"no \['audio'\]"):
        E.finetune("sentiment", mute, **kw)


@pytest.mark.parametrize("task, scores, patience, best, run", [
    ("sentiment", [1.0, 1.1, 0.9, 1.0, 0.8, 0.7], 2, 6, 6),  # MAE, lower is better; an improvement resets patience
    ("sentiment", [1.0, 1.0, 1.2, 1.3, 0.1], 2, 1, 3),       # a tie is no improvement; stop after `patience` stale
    ("emotion", [0.6, 0.3, 0.4], 5, 1, 3),                   # F1 (accuracy, scripted 1 - F1, would pick epoch 2)
])
def test_model_selection_and_early_stopping_by_hand(toy, tok, monkeypatch, task, scores, patience, best, run):
    """With the validation metric scripted epoch by epoch: selection runs on the validation split only, the
    best epoch (1-based), the epochs run and the reported validation metrics follow SELECT and `patience`,
    and the test split is evaluated with the best epoch's weights, restored."""
    select, _ = E.selection_metric(task)
    real, val, weights, test_weights = E.evaluate, [], [], []

    def scripted(ft, items, *a, **k):
        source = items[0]["ex"]["source"]                        # cached feature items carry their example
        snapshot = {n: p.detach().clone() for n, p in ft.named_parameters() if p.requires_grad}
        if source == "downstream_test":
            test_weights.append(snapshot)
            return real(ft, items, *a, **k)
        assert source == "downstream_validation", source         # never the train or test split
        out = dict(real(ft, items, *a, **k), **{select: scores[len(val)]})
        if task == "emotion":
            out["accuracy"] = 1 - scores[len(val)]
        val.append(out)
        weights.append(snapshot)
        return out
    monkeypatch.setattr(E, "evaluate", scripted)
    r = E.finetune(task, _splits(toy, tok), **_finetune_kw(tok, epochs=len(scores), patience=patience))
    assert (r["best_epoch"], r["epochs_run"]) == (best, run) and len(val) == run and len(test_weights) == 1
    assert r["val"] == val[best - 1]
    assert all(torch.equal(test_weights[0][n], w) for n, w in weights[best - 1].items())
    if best != run:   # the restore has something to undo: training moved the weights after the best epoch
        assert any(not torch.equal(weights[run - 1][n], w) for n, w in weights[best - 1].items())


def test_selection_metric_and_mean_std():
    assert E.selection_metric("sentiment") == ("mae", True) and E.selection_metric("emotion") == ("f1", False)
    assert E.selection_metric("glue", "MRPC") == ("f1", False) and E.selection_metric("glue", "STS-B") == ("pearson", False)
    assert E.selection_metric("glue", "CoLA") == ("mcc", False)
    # mean and sample standard deviation (ddof 1): [0, 0, 0.9] -> 0.3, sqrt((0.09 + 0.09 + 0.36) / 2)
    (m, s), = E.mean_std([{"a": 0.0}, {"a": 0.0}, {"a": 0.9}]).values()
    assert m == pytest.approx(0.3) and s == pytest.approx(math.sqrt(0.27))
    assert E.mean_std([{"a": 0.5}]) == {"a": (0.5, 0.0)}


def test_cached_multiple_choice_rows_belong_to_their_question(toy, tok):
    """encode_examples batches K candidate rows per question: question j's cached rows are those of
    encoding question j alone."""
    icode = tiny_icode(tok.vocab_size)
    examples = _splits(toy, tok)["train"][:3]
    batch = E.encode_examples(icode, examples, "mc", ("text",), D.TOY_DATA, tok, "cpu")
    for j, ex in enumerate(examples):
        alone = E.encode_examples(icode, [ex], "mc", ("text",), D.TOY_DATA, tok, "cpu")[0]["text"]
        assert len(batch[j]["text"]) == len(ex["answers"]) == len(alone)
        for got, want in zip(batch[j]["text"], alone):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_cached_features_are_the_eval_mode_encoders(toy, tok):
    """With dropout in the encoders (the paper preset has it) and the model left in training mode, the
    cached features are the deterministic eval-mode ones that evaluation without a cache would see."""
    torch.manual_seed(0)
    icode = ICode(with_dropout("tiny", text_vocab=tok.vocab_size)).train()
    examples = _splits(toy, tok)["train"][:2]
    mods = ("video", "text", "audio")
    got = E.encode_examples(icode, examples, "sentiment", mods, D.TOY_DATA, tok, "cpu")
    inputs, _, _ = E.make_inputs(examples, "sentiment", mods, D.TOY_DATA, tok)
    with torch.no_grad():
        feats, valids = E.FineTuner(icode.eval(), "sentiment", 1, mods).encode(inputs)
        noisy, _ = E.FineTuner(icode.train(), "sentiment", 1, mods).encode(inputs)
    assert not torch.allclose(noisy["text"], feats["text"])                 # dropout is on in training
    for m in mods:
        want = E._rows(feats[m], valids[m])
        for j in range(2):
            torch.testing.assert_close(got[j][m][0] if m == "text" else got[j][m], want[j], atol=1e-6, rtol=1e-5)


def test_run_seeds_uses_consecutive_seeds(monkeypatch):
    """Appendix A.2: mean and std over fine-tuning seeds seed, seed + 1, ..."""
    import argparse
    seeds = []
    monkeypatch.setattr(E, "finetune", lambda task, splits, **kw: seeds.append(kw["seed"]) or
                        {"test": {"a": float(kw["seed"])}, "val": {"a": 0.0}})
    args = argparse.Namespace(seeds=3, seed=5, preset="tiny", lr=1e-3, lr_encoders=0.0, weight_decay=0.0, epochs=1,
                              patience=1, batch=4, clip=1.0, glue_task=None)
    res = E.run_seeds("sentiment", {}, args, training.distributed.setup_distributed("cpu"), None, "merge", ("text",), D.TOY_DATA,
                      None, {})
    assert seeds == [5, 6, 7] and res["test"]["a"] == (6.0, 1.0)


def test_read_glue_tsv(tmp_path):
    cola = tmp_path / "cola.tsv"
    cola.write_text("gj04\t1\t\tThe book was read.\ngj04\t0\t*\tBook the read was.\nbroken row\n")
    assert evaluation.glue.read_glue_tsv(str(cola), "CoLA") == [("The book was read.", None, 1), ("Book the read was.", None, 0)]
    sts = tmp_path / "sts.tsv"
    sts.write_text("index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
                   "0\tx\tx\tx\tx\tx\tx\tA man plays.\tA man is playing.\t4.75\n")
    assert evaluation.glue.read_glue_tsv(str(sts), "STS-B") == [("A man plays.", "A man is playing.", 4.75)]
    rte = tmp_path / "rte.tsv"
    rte.write_text("index\tsentence1\tsentence2\tlabel\n0\tA\tB\tnot_entailment\n1\tC\tD\tentailment\n2\tE\tF\tmaybe\n")
    assert evaluation.glue.read_glue_tsv(str(rte), "RTE") == [("A", "B", 1), ("C", "D", 0)]   # unknown label skipped


def _finite(d):
    return all(math.isfinite(v) for v in d.values())


def test_finetune_smoke_and_best_checkpoint(toy, tmp_path):
    """One task on the toy world through eval.main; the saved best weights reproduce the test metrics."""
    out = str(tmp_path / "out")
    res = E.main(["--task", "sentiment", "--toy-dir", toy, "--ckpt", "none", "--epochs", "2", "--batch", "4",
                  "--out", out, "--device", "cpu"])
    test = {k: v[0] for k, v in res["test"].items()}
    assert set(test) == {"mae", "corr", "acc2_nonneg", "f1_nonneg", "acc2_pos", "f1_pos", "acc7"}
    assert _finite(test)
    with open(os.path.join(out, "sentiment_V+L+S", "results.json")) as f:
        sizes = json.load(f)["examples"]
    assert sizes == {s: len(pipeline.index.ManifestRows(os.path.join(toy, f"downstream_{s}.jsonl")))
                     for s in ("train", "validation", "test")}
    weights = os.path.join(out, "sentiment_V+L+S", "seed0", "model.safetensors")
    assert os.path.isfile(weights)
    # reload the best weights into a fresh model: same test metrics as reported
    from safetensors.torch import load_model
    tok = pipeline.text.load_tokenizer(os.path.join(toy, "tokenizer.json"))
    ft = E.FineTuner(tiny_icode(tok.vocab_size), "sentiment", 1, ("video", "text", "audio"))
    load_model(ft, weights, strict=False)
    test_ex = pipeline.manifest.load_examples(os.path.join(toy, "downstream_test.jsonl"), D.TOY_DATA, tok)
    again = E.evaluate(ft, test_ex, "sentiment", False, D.TOY_DATA, tok, "cpu")
    assert again["mae"] == pytest.approx(test["mae"], abs=1e-4)


@pytest.mark.parametrize("task,mods,extra", [
    ("emotion", "V,S", []),
    ("mc", "L,S", ["--fusion", "co"]),
    ("binary", "L", ["--lr-encoders", "1e-4"]),       # encoders trained too: the uncached path
])
def test_finetune_tasks_and_modality_subsets(toy, tmp_path, task, mods, extra):
    res = E.main(["--task", task, "--toy-dir", toy, "--ckpt", "none", "--epochs", "1", "--batch", "4",
                  "--modalities", mods, "--out", str(tmp_path), "--device", "cpu", "--seeds", "2"] + extra)
    test = {k: v for k, v in res["test"].items()}
    assert _finite({k: m for k, (m, s) in test.items()}) and _finite({k: s for k, (m, s) in test.items()})
    assert len(res["runs"]) == 2
    keys = {"emotion": {"accuracy", "f1", "precision", "recall", "subset_acc"}}.get(task, {"acc"})
    assert set(test) == keys


def test_zero_shot_retrieval(toy, tok):
    model = tiny_icode(tok.vocab_size)
    res = evaluation.retrieval.zero_shot_retrieval(model, os.path.join(toy, "video_test.jsonl"), D.TOY_DATA, tok)
    dirs = {k for k in res if "->" in k}
    assert dirs == {"video->text", "text->video", "video->audio", "audio->video", "text->audio", "audio->text"}
    for k in dirs:
        assert set(res[k]) == {"R@1", "R@5", "R@10"} and all(0 <= v <= 1 for v in res[k].values())
        assert res[k]["R@10"] == 1.0                                    # 4 held-out clips: K >= N
    # the values: cosine similarities of each modality fused alone (section 4.2.2) on the unmasked inputs,
    # computed here in one batch, against the function's batches of 2, at K < N
    ex = pipeline.manifest.load_examples(os.path.join(toy, "video_test.jsonl"), D.TOY_DATA, tok)
    res = evaluation.retrieval.zero_shot_retrieval(model, ex, D.TOY_DATA, tok, batch_size=2, ks=(1, 2, 3))
    with torch.no_grad():
        feats, valids = model.pretrain_features(D.collate(ex, D.TOY_DATA, tok), masked=False)
        r = {m: torch.nn.functional.normalize(v, dim=-1) for m, v in model.contrastive_representations(feats, valids).items()}
    for a, b in (("video", "text"), ("video", "audio"), ("text", "audio")):
        sim = r[a] @ r[b].T
        assert res[f"{a}->{b}"] == evaluation.metrics.retrieval_recall(sim, (1, 2, 3))
        assert res[f"{b}->{a}"] == evaluation.metrics.retrieval_recall(sim.T, (1, 2, 3))
    assert len({tuple(v.values()) for k, v in res.items() if "->" in k}) > 1  # not one constant answer


def test_retrieval_ceiling_of_identical_descriptions(tmp_path):
    """Clips sharing a description cannot be told apart: a perfect model ranks the n clips of the query's group
    first in a random order, so R@K = mean over clips of min(1, K / n); brute force over every order agrees.
    Directions with video are bounded by the captions (colour, shape, motion), text<->audio by the transcripts."""
    import itertools
    from evaluation.retrieval import ceiling, toy_ceiling
    keys = ["a", "a", "a", "b", "c", "c"]
    got = ceiling(keys, ks=(1, 2))
    assert got["R@1"] == pytest.approx((3 * (1 / 3) + 1 + 2 * (1 / 2)) / 6)
    for K in (1, 2):   # every order within the groups, equally likely
        hits = []
        for i, k in enumerate(keys):
            group = [j for j, x in enumerate(keys) if x == k]
            hits.append(sum(p.index(i) < K for p in itertools.permutations(group)) / math.factorial(len(group)))
        assert got[f"R@{K}"] == pytest.approx(sum(hits) / len(hits))
    rows = [{"caption": "a red circle moving left", "text": f"look red circle moving left {w}"} for w in ("good", "bad")]
    rows.append({"caption": "a blue square moving up", "text": "so blue square moving up now"})
    path = tmp_path / "held.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = toy_ceiling(str(path), ks=(1,))
    assert c["video->text"]["R@1"] == c["audio->video"]["R@1"] == pytest.approx((0.5 + 0.5 + 1) / 3)
    assert c["text->audio"]["R@1"] == c["audio->text"]["R@1"] == 1.0     # the transcripts differ


def test_glue_smoke(tmp_path, toy):
    gd = tmp_path / "RTE"
    gd.mkdir()
    rows = "index\tsentence1\tsentence2\tlabel\n" + "".join(
        f"{i}\tthe {c} circle looks good\tit is {c}\t{'entailment' if i % 2 else 'not_entailment'}\n"
        for i, c in enumerate(["red", "blue", "green", "red", "blue", "green"]))
    (gd / "train.tsv").write_text(rows)
    (gd / "dev.tsv").write_text(rows)
    res = E.main(["--task", "glue", "--glue-task", "RTE", "--glue-dir", str(gd), "--toy-dir", toy, "--ckpt", "none",
                  "--epochs", "1", "--batch", "4", "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert set(res["test"]) == {"acc"} and 0 <= res["test"]["acc"][0] <= 1


def test_report_on_the_tiny_toy_world(toy, tmp_path):
    """`python eval.py` end to end on the smallest toy world, after a two-step `python train.py` (stage one
    included): it pretrains the D+M, D+C and V+M rows with the main run's recipe on their own sources, from the
    same encoder folders; NP+M is those encoders under a fresh fusion; every table holds 3-seed mean +- std."""
    import train as T
    runs = tmp_path / "runs"
    T.main(["--toy-dir", toy, "--out", str(runs / "toy"), "--toy-encoders", str(runs / "enc"), "--encoder-steps", "2",
            "--steps", "2", "--batch", "4", "--workers", "0", "--no-eval", "--device", "cpu"])
    out = str(tmp_path / "report")
    res = E.main(["--toy-dir", toy, "--ckpt", str(runs / "toy"), "--runs-dir", str(runs), "--epochs", "1",
                  "--batch", "8", "--out", out, "--device", "cpu"])
    assert list(res["tables"]["emotion"]) == ["NP+M", "D+M", "D+C", "V+M", "D+V+M"]
    for row, fusion, sources in (("D_M", "merge", pipeline.toy.TOY_DUAL), ("D_C", "co", pipeline.toy.TOY_DUAL),
                                 ("V_M", "merge", pipeline.toy.TOY_VIDEOS)):
        state = training.checkpoint.read_state(res["ckpts"][row.replace("_", "+")])
        assert state["config"]["fusion"]["mode"] == fusion and state["step"] == 2
        assert state["args"]["data"] == [os.path.join(toy, f) for f in sources]
        assert state["args"]["text_encoder"] == str(runs / "enc" / "text")
    assert res["ckpts"]["NP+M"] is None and res["encoders"]["speech"] == str(runs / "enc" / "speech")
    for task in ("sentiment", "emotion", "binary", "mc"):
        for row, r in res["tables"][task].items():
            assert len(r["runs"]) == 3 and all(len(ms) == 2 for ms in r["test"].values())
    assert set(res["subsets"]) == {"sentiment", "emotion", "binary"}
    assert all(len(v) == 7 for v in res["subsets"].values())
    assert res["subsets"]["emotion"]["V+L+S"] is res["tables"]["emotion"]["D+M"]
    md = open(os.path.join(out, "report.md")).read()
    for title in ("Table 1", "Table 2", "Table 3", "Tables 5-6", "Table 8", "claims, checked", "ceiling"):
        assert title in md
    assert os.path.getsize(os.path.join(out, "report.png")) > 0 and "nan" not in md.lower()
    # rows pretrained for another main run are not silently mixed in
    T.main(["--toy-dir", toy, "--out", str(runs / "other"), "--toy-encoders", str(runs / "enc"), "--steps", "3",
            "--batch", "4", "--workers", "0", "--no-eval", "--device", "cpu"])
    with pytest.raises(ValueError, match=r"another recipe .*'steps': \(2, 3\).*remove .*toy_D_M"):
        evaluation.rows.pretrain_rows(training.checkpoint.resolve_ckpt(str(runs / "other")), toy, str(runs),
                                      torch.device("cpu"))


def test_claim_verdicts_are_computed_from_the_numbers():
    """A claim holds only when its difference exceeds two standard errors (sqrt((s_a^2 + s_b^2) / n)), fails when
    it is that far the other way, and is inconclusive between; the report's rows come from the numbers: changing
    one mean or one std changes the verdict."""
    from evaluation.report import combine, paper_claims, toy_checks, verdict
    d, se, v = verdict((0.60, 0.01), (0.50, 0.01), 3)
    assert d == pytest.approx(0.10) and se == pytest.approx(math.sqrt(0.0002 / 3)) and v == "holds"
    assert verdict((0.50, 0.01), (0.60, 0.01), 3)[2] == "does not hold"
    assert verdict((0.52, 0.03), (0.50, 0.03), 3)[2] == "inconclusive"          # 0.02 < 2 * sqrt(0.0018 / 3) = 0.049
    assert verdict((0.40, 0.0), (0.50, 0.0), 3, lower=True)[2] == "holds"       # MAE: lower is better
    assert verdict((0.5, 0.0), (0.5, 0.0), 3)[2] == "inconclusive"
    assert combine(["holds", "holds"]) == "holds" and combine(["holds", "inconclusive"]) == "inconclusive"
    assert combine(["holds", "does not hold", "inconclusive"]) == "does not hold"

    def cell(mean, std=0.01):
        return {"test": {"mae": (1 - mean, std), "f1": (mean, std), "acc": (mean, std)}}
    rows = {"NP+M": 0.3, "D+M": 0.6, "D+C": 0.5, "V+M": 0.7, "D+V+M": 0.8}
    subsets = {"V": 0.3, "L": 0.3, "S": 0.5, "V+L": 0.25, "V+S": 0.6, "L+S": 0.7, "V+L+S": 0.9}
    res = {"seeds": 3, "tables": {t: {r: cell(v) for r, v in rows.items()} for t in ("sentiment", "emotion", "binary", "mc")},
           "subsets": {t: {k: cell(v) for k, v in subsets.items()} for t in ("sentiment", "emotion", "binary")}}
    got = {(c["where"], c["claim"], c["task"]): c["verdict"] for c in paper_claims(res) + toy_checks(res)}
    assert got[("Section 6", "pretraining the fusion (D+M, V+M) beats no pretraining (NP+M)", "mc")] == "holds"
    assert got[("Table 1", "dual-modality data beats videos (D+M vs V+M)", "sentiment")] == "does not hold"
    assert got[("Table 2", "co-attention beats merge-attention (D+C vs D+M)", "emotion")] == "does not hold"
    assert got[("Table 3", "video pretraining is best (V+M vs every other row)", "binary")] == "does not hold"
    assert got[("Table 8", "two modalities beat each of their single ones", "emotion")] == "does not hold"  # V+L < L
    assert got[("Table 8", "speech is the most effective single modality", "emotion")] == "holds"
    assert got[("toy world", "all three modalities beat every pair (the labels need all three)", "binary")] == "holds"
    assert got[("Table 8", "language-speech is the best pair", "emotion")] == "holds"
    assert got[("toy world", "the best row is above chance (25%)", "mc")] == "holds"
    res["tables"]["emotion"]["D+C"] = cell(0.62, std=0.05)                     # within noise of D+M's 0.6
    assert {c["claim"]: c["verdict"] for c in paper_claims(res) if c["task"] == "emotion"}[
        "co-attention beats merge-attention (D+C vs D+M)"] == "inconclusive"
    res["tables"]["emotion"]["D+C"] = cell(0.70)
    assert {c["claim"]: c["verdict"] for c in paper_claims(res) if c["task"] == "emotion"}[
        "co-attention beats merge-attention (D+C vs D+M)"] == "holds"


def test_flags_that_would_be_ignored_are_refused(toy, tok, tmp_path):
    """A checkpoint brings its preset (clip shape, LRs) and fusion mode: another --preset or --fusion is an
    error, not a silent switch; the report runs every subset and fusion mode itself, so --modalities /
    --fusion there are errors too. train.py --init checks the preset the same way."""
    import train as T
    model = tiny_icode(tok.vocab_size)
    ckpt = training.checkpoint.save_checkpoint(str(tmp_path / "run"), 1, model, T.build_optimizer(model, 1e-3, 1e-3, 0.0), None,
                             T.parse_args([]), training.distributed.Dist())
    common = ["--task", "sentiment", "--toy-dir", toy, "--ckpt", ckpt, "--out", str(tmp_path), "--device", "cpu"]
    with pytest.raises(ValueError, match="pretrained with --preset tiny, this run has --preset paper: give --preset tiny"):
        E.main(common + ["--preset", "paper"])
    with pytest.raises(ValueError, match="pretrained with merge fusion, not --fusion co"):
        E.main(common + ["--fusion", "co"])
    for flag in (["--modalities", "L,S"], ["--fusion", "co"]):
        with pytest.raises(SystemExit):
            E.parse_args(flag)
    assert E.parse_args(["--task", "emotion"]).modalities == "V,L,S"
    with pytest.raises(ValueError, match="give --preset tiny"):
        T.main(["--init", ckpt, "--preset", "paper", "--toy-dir", toy, "--out", str(tmp_path / "init")])
    with pytest.raises(ValueError, match="pretrained with merge fusion, not --fusion co"):
        T.main(["--init", ckpt, "--fusion", "co", "--toy-dir", toy, "--out", str(tmp_path / "init")])
