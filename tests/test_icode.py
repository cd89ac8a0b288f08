"""ICode assembly (section 4.1): every subset in both fusion modes, targets and heads, unused parameters."""
import itertools
import json
from dataclasses import asdict, replace

import pytest
import torch

import icode
import pipeline.targets
from icode import ICode, ICodeConfig, preset
from losses import PAPER_WEIGHTS, count_targets
from model.fusion import MODALITIES, masked_mean
from tools.benchmark import synthetic_batch
from train import PretrainObjective

SUBSETS = [s for k in (1, 2, 3) for s in itertools.combinations(MODALITIES, k)]


@pytest.fixture(scope="module", params=["merge", "co"])
def model(request):
    torch.manual_seed(0)
    return ICode(preset("tiny", request.param)).eval()


def subset_batch(model, subset, B=3):
    batch = synthetic_batch(model.cfg, B, text_len=12, seconds=0.5, frames=4, res=64, device="cpu")
    batch["text_attention"][1, 8:] = False
    batch["text_labels"][1, 8:] = -100
    batch["audio_attention"][2, 5000:] = False
    batch["modalities"] = subset
    return batch


def test_encode_every_subset(model):
    b = subset_batch(model, MODALITIES)
    for subset in SUBSETS:
        kw = {"video": b["video"] if "video" in subset else None,
              "text": b["text_ids"] if "text" in subset else None,
              "audio": b["audio"] if "audio" in subset else None}
        out = model.encode(**kw, text_attention=b["text_attention"], audio_attention=b["audio_attention"])
        assert set(out.tokens) == set(subset)
        # the joint representation is the mean of the per-modality means over valid tokens (section 5.2)
        means = [masked_mean(out.tokens[m], out.valid[m]) for m in subset]
        assert torch.allclose(out.joint, torch.stack(means).mean(0), atol=1e-6)
        for m in subset:   # pooled: each row's mean over its own valid tokens, by hand (rows 1, 2 are padded)
            v = out.valid[m] if out.valid[m] is not None else torch.ones(out.tokens[m].shape[:2], dtype=torch.bool)
            want = torch.stack([out.tokens[m][i, v[i]].mean(0) for i in range(len(v))])
            assert torch.allclose(out.pooled[m], want, atol=1e-6), m
        if "audio" in subset:
            assert out.valid["audio"][2].sum() < out.valid["audio"][0].sum()   # padding reaches the fusion
        assert torch.isfinite(out.joint).all()


def test_masked_unit_logits_and_targets_every_subset(model):
    for subset in SUBSETS:
        b = subset_batch(model, subset)
        targets = model.targets(b)
        assert set(targets) == set(subset)
        feats, valids = model.pretrain_features(b)
        logits = model.masked_unit_logits(feats, valids, targets)
        names = {"text": "mlm", "video": "mvm", "audio": "msm"}
        assert set(logits) == {names[m] for m in subset}
        if "video" in subset:
            lg, tg = logits["mvm"]
            assert lg.shape == (int(b["video_mask"].sum()), model.cfg.video_codebook)
            assert torch.equal(tg, b["video_targets"][b["video_mask"]])
        if "audio" in subset:
            lg, tg = logits["msm"]
            m = b["audio_mask"]
            assert lg.shape == (int(m.sum()) * 2, model.cfg.speech_vars)
            assert torch.equal(tg, b["audio_targets"][m].reshape(-1))
        if "text" in subset:
            lg, tg = logits["mlm"]
            assert torch.equal(tg, b["text_labels"][b["text_labels"] != -100])
        # the values: the heads over all positions of the merged fusion pass (with the padding masks), then
        # the masked rows picked out by hand
        with torch.no_grad():
            fused = model.fusion(feats, valids)
            if "text" in subset:
                h = model.mlm_head
                sel = b["text_labels"] != -100
                want = h.decoder(h.layer_norm(torch.nn.functional.gelu(h.dense(fused["text"]))))[sel]
                assert torch.allclose(logits["mlm"][0], want, atol=1e-5)
            if "video" in subset:
                B, T_v, H_v, W_v, _ = feats["video"].shape
                up = model.mvm_head.upsample(fused["video"].reshape(B, T_v, H_v, W_v, -1))
                want = model.mvm_head.classifier(up)[b["video_mask"]]
                assert torch.allclose(logits["mvm"][0], want, atol=1e-5)
            if "audio" in subset:
                want = model.msm_head.classifier(fused["audio"])[b["audio_mask"]].reshape(-1, model.cfg.speech_vars)
                assert torch.allclose(logits["msm"][0], want, atol=1e-5)


def test_pretraining_encoders_see_the_masked_inputs(model):
    """Masked pass: DeBERTa gets the MLM-corrupted ids, Video Swin the patch mask of the masked tubes (masked
    where the token grid is, section 4.2.1 / A.1), WavLM the span-masked frames. Unmasked pass (contrastive,
    `unmasked_contrastive`): the clean ids and no masks."""
    b = subset_batch(model, MODALITIES)
    seen = {}
    hooks = [enc.register_forward_pre_hook(lambda mod, args, kw, name=name: seen.__setitem__(name, (args, kw)),
                                           with_kwargs=True)
             for name, enc in (("text", model.text), ("vision", model.vision), ("speech", model.speech))]
    try:
        with torch.no_grad():
            model.pretrain_features(b)
            masked = dict(seen)
            model.pretrain_features(b, masked=False)
    finally:
        for h in hooks:
            h.remove()
    ids = masked["text"][0][0]
    assert torch.equal(ids, b["text_ids"])
    picked = b["text_labels"][[0, 2]] != -100                    # (row 1's labels are cut short by subset_batch)
    corrupted = ids[[0, 2]] != b["text_ids_clean"][[0, 2]]
    assert corrupted[picked].float().mean() > 0.8 and not corrupted[~picked].any()
    patch = masked["vision"][1]["patch_mask"]                    # [B, T/2, H/4, W/4]
    token = b["video_mask"]                                      # [B, T, H/16, W/16]
    for i, t, y, x in itertools.product(range(3), range(patch.shape[1]), range(patch.shape[2]), range(patch.shape[3])):
        assert patch[i, t, y, x] == (token[i, 2 * t, y // 4, x // 4] or token[i, 2 * t + 1, y // 4, x // 4])
    assert 0 < patch.float().mean() < 1
    assert torch.equal(masked["speech"][1]["frame_mask"], b["audio_mask"]) and b["audio_mask"].any()
    assert torch.equal(seen["text"][0][0], b["text_ids_clean"])
    assert seen["vision"][1]["patch_mask"] is None and seen["speech"][1]["frame_mask"] is None


def test_contrastive_representations_fuse_each_modality_alone(model):
    """Section 4.2.2: each modality goes through the fusion network individually: r_m is what `encode` pools
    for m given alone, and not the pooled tokens of a joint pass over all three."""
    b = subset_batch(model, MODALITIES)
    inputs = {"video": b["video"], "text": b["text_ids_clean"], "audio": b["audio"]}
    masks = dict(text_attention=b["text_attention"], audio_attention=b["audio_attention"])
    with torch.no_grad():
        r = model.contrastive_representations(*model.pretrain_features(b, masked=False))
        joint = model.encode(**inputs, **masks).pooled
        for m in MODALITIES:
            alone = model.encode(**{m: inputs[m]}, **masks).pooled[m]
            torch.testing.assert_close(r[m], alone, atol=1e-6, rtol=1e-5)
            assert (r[m] - joint[m]).abs().max() > 0.05, m


def test_targets_from_tokenizers_when_no_cache(model):
    b = subset_batch(model, ("video", "audio"))
    del b["video_targets"], b["audio_targets"]
    t = model.targets(b)
    ids = model.video_tokenizer(b["video"])
    assert torch.equal(t["video"][b["video_mask"]], ids[b["video_mask"]])
    assert (t["video"][~b["video_mask"]] == -100).all()
    assert (t["audio"][~b["audio_mask"]] == -100).all()
    speech = model.speech_tokenizer(icode.normalize_waveform(b["audio"], b["audio_attention"]))   # [B, T_s, G]
    m = b["audio_mask"]
    assert m.any() and torch.equal(t["audio"][m], speech[m])


def test_a_cache_of_combined_speech_ids_keeps_its_layout():
    """An offline cache may hold the combined speech ids i0 * V + i1 ([B, T_s], for msm_combined=True) instead
    of the per-group ids ([B, T_s, G]): the targets keep that layout, -100 at unmasked frames, and the loss
    normaliser counts one class per masked frame."""
    torch.manual_seed(0)
    cfg = preset("tiny")
    cfg.msm_combined = True
    m = ICode(cfg).eval()
    b = subset_batch(m, ("audio",), B=4)     # B == T_s here: a broadcast over the wrong axis would not raise
    ids = b["audio_targets"]                                               # [B, T_s, G]
    b["audio_targets"] = ids[..., 0] * cfg.speech_vars + ids[..., 1]       # [B, T_s]
    b["audio_mask"] = torch.tensor([[1, 0, 0, 1], [0, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 1]], dtype=torch.bool)
    b["audio_targets"] = b["audio_targets"][:, :4]
    assert 0 < b["audio_mask"].sum() < b["audio_mask"].numel()
    t = m.targets(b)["audio"]
    want = torch.where(b["audio_mask"], b["audio_targets"], torch.full_like(b["audio_targets"], -100))
    assert torch.equal(t, want)
    assert count_targets({"audio": t}, True)[2] == b["audio_mask"].sum()
    per_group = torch.where(b["audio_mask"][..., None], ids[:, :4], torch.full_like(ids[:, :4], -100))
    assert count_targets({"audio": per_group}, True)[2] == b["audio_mask"].sum()
    lg, tg = m.msm_head(torch.randn(4, 4, cfg.fusion.dim), t)
    assert torch.equal(tg, b["audio_targets"][b["audio_mask"]])


@pytest.mark.parametrize("learned", [False, True])
def test_unused_parameters_match_autograd(model, learned):
    """The parameters ICode.unused_parameters names are exactly those without gradient (with learned eq. (3)
    weights too: a weight whose terms are absent gets none)."""
    if learned:
        torch.manual_seed(0)
        model = ICode(replace(model.cfg, learned_loss_weights=True)).eval()
    obj = PretrainObjective(model, PAPER_WEIGHTS)
    for subset in SUBSETS:
        b = subset_batch(model, subset)
        targets = model.targets(b)
        model.zero_grad(set_to_none=True)
        loss, _ = obj(b, targets, count_targets(targets, False), 1)
        loss.backward()
        no_grad = {n for n, p in model.named_parameters() if p.requires_grad and p.grad is None}
        ids = {id(p) for p in model.unused_parameters(subset)}
        named = {n for n, p in model.named_parameters() if id(p) in ids}
        assert named == no_grad, (subset, sorted(named ^ no_grad)[:6])


def test_config_round_trip():
    """A config through JSON and back is itself; one written before a field existed gets the value that
    reproduces it (raw audio before normalize_audio, the random projections before the tokenizer fields)."""
    for mode in ("merge", "co"):
        cfg = preset("paper", mode)
        assert ICodeConfig.from_dict(json.loads(json.dumps(asdict(cfg)))) == cfg
    with pytest.raises(ValueError, match="bogus"):
        ICodeConfig.from_dict({"bogus": 1})
    old = {k: v for k, v in json.loads(json.dumps(asdict(preset("tiny")))).items()
           if k not in icode.FIELDS_ADDED_LATER}
    assert preset("tiny").normalize_audio and ICodeConfig.from_dict(old) == replace(preset("tiny"), normalize_audio=False)


def test_the_speech_encoder_gets_the_normalised_waveform(model, monkeypatch):
    """normalize_audio: WavLM's input is each row normalised over its own valid samples, padding 0."""
    from icode import normalize_waveform
    b = subset_batch(model, ("audio",))
    b["audio"][2] += 3.0                                   # an offset that only the normalisation removes
    seen = []
    h = model.speech.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    try:
        with torch.no_grad():
            model.pretrain_features(b)
    finally:
        h.remove()
    assert model.cfg.normalize_audio
    torch.testing.assert_close(seen[0], normalize_waveform(b["audio"], b["audio_attention"]))
    assert (seen[0][2, 5000:] == 0).all() and abs(seen[0][2, :5000].mean().item()) < 1e-4


def test_default_tokenizers_follow_the_config_and_masks_may_run_longer(model):
    """ICode's tokenizers are those its config's tokenizer_seed implies; an audio mask longer than the
    tokenizer's frames (collate pads to the batch) is cropped to them."""
    m = ICode(replace(preset("tiny"), tokenizer_seed=7))
    assert (m.video_tokenizer.seed, m.speech_tokenizer.seed) == (7, 8)
    b = subset_batch(model, ("audio",))
    t = model.targets(b)["audio"]
    longer = dict(b, audio_mask=torch.cat([b["audio_mask"], torch.ones(3, 2, dtype=torch.bool)], 1))
    assert torch.equal(model.targets(longer)["audio"], t)


def test_tied_mlm_decoder():
    """tie_mlm: the MLM decoder is the text encoder's word-embedding Parameter itself."""
    m = ICode(replace(preset("tiny"), tie_mlm=True))
    assert m.mlm_head.decoder.weight is m.text.word_embeddings.weight
    assert sum(p is m.text.word_embeddings.weight for p in m.parameters()) == 1


def test_pretrained_target_tokenizers(tmp_path):
    """Pretrained target tokenizers (a VQGAN for MVM, a wav2vec 2.0 quantizer for MSM): pretrained_targets
    gives their architectures and head sizes for the config, the model's targets are their ids on the unmasked
    input (the waveform normalised as the encoder sees it), their weights are the model's (a model built from
    the config alone gets them from a state dict), and a codebook, grid or architecture that does not fit is
    refused."""
    from common import SMALL_VQ, save_vqgan_folder, save_wav2vec2_folder

    from icode import normalize_waveform, pretrained_targets
    fields, toks = pretrained_targets(save_vqgan_folder(tmp_path / "vq"), save_wav2vec2_folder(tmp_path / "w2v"))
    cfg = replace(preset("tiny"), **fields)
    assert (cfg.video_tokenizer["n_embed"], cfg.video_codebook, cfg.speech_groups, cfg.speech_vars) == (128, 128, 2, 40)
    assert ICodeConfig.from_dict(json.loads(json.dumps(asdict(cfg)))) == cfg   # as in a checkpoint's state.json
    m = ICode(cfg, tokenizers=toks)
    assert (m.video_tokenizer, m.speech_tokenizer) == (toks["video"], toks["speech"])
    assert (m.mvm_head.classifier.out_features, m.msm_head.classifier.out_features) == (128, 2 * 40)
    b = {k: v for k, v in subset_batch(m, MODALITIES).items() if not k.endswith("_targets")}  # no cached ids
    t = m.targets(b)
    with torch.no_grad():
        video_ids = toks["video"](b["video"])
        audio_ids = toks["speech"](normalize_waveform(b["audio"], b["audio_attention"]))
    assert torch.equal(t["video"], torch.where(b["video_mask"], video_ids, -100))
    assert torch.equal(t["audio"], torch.where(b["audio_mask"][..., :audio_ids.shape[1], None], audio_ids, -100))
    assert (t["video"] >= 0).any() and (t["audio"] >= 0).any()
    bare = ICode(cfg)                     # the architectures only: random frozen weights until a state dict
    assert not torch.equal(bare.targets(b)["video"], t["video"])
    bare.load_state_dict(m.state_dict())
    assert all(torch.equal(bare.targets(b)[k], t[k]) for k in ("video", "audio"))
    with pytest.raises(ValueError, match="video tokenizer: 128 codes on 16-pixel patches, the MVM head predicts 256"):
        ICode(replace(preset("tiny"), video_tokenizer=fields["video_tokenizer"]))
    with pytest.raises(ValueError, match="speech tokenizer: 2 x 40 codes"):
        ICode(replace(preset("tiny"), speech_tokenizer=fields["speech_tokenizer"]))
    f8, _ = pretrained_targets(save_vqgan_folder(tmp_path / "vq8", replace(SMALL_VQ, ch_mult=(1, 1, 2, 2))))
    with pytest.raises(ValueError, match="128 codes on 8-pixel patches"):
        ICode(replace(preset("tiny"), **f8))
    with pytest.raises(ValueError, match="video tokenizer: its architecture .* is not the config's"):
        ICode(replace(cfg, video_tokenizer=asdict(replace(SMALL_VQ, num_res_blocks=2))), tokenizers=toks)
    with pytest.raises(ValueError, match="pretrained video tokenizer's architecture but no loaded tokenizer"):
        pipeline.targets.target_quantize(cfg)          # an offline cache never gets ids of untrained weights
    assert pipeline.targets.target_quantize(cfg, tokenizers=toks).fingerprint == icode.target_fingerprint(cfg, *toks.values())
    with pytest.raises(ValueError, match="a pretrained speech tokenizer was given, but the config has no"):
        ICode(preset("tiny"), tokenizers={"speech": toks["speech"]})
    with pytest.raises(FileNotFoundError, match="nothere"):
        pretrained_targets(speech=str(tmp_path / "nothere"))


def test_strict_loading_and_shard_index_by_hand(tmp_path):
    """load_state_strict returns the unused tensors except the ignored prefixes; a shard index naming a
    tensor no shard holds is an error naming it."""
    from safetensors.torch import load_file, save_file

    from model.weights import _load_shards, load_state_strict
    lin = torch.nn.Linear(2, 3)
    sd = {**{k: v.clone() for k, v in lin.state_dict().items()}, "decoder.w": torch.ones(1), "extra.w": torch.ones(1)}
    assert load_state_strict(lin, sd, ignore_prefixes=("decoder.",)) == ["extra.w"]
    save_file({"a": torch.ones(2)}, str(tmp_path / "s1.safetensors"))
    (tmp_path / "m.index.json").write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors"}}))
    with pytest.raises(KeyError, match=r"\['b'\]"):
        _load_shards(str(tmp_path / "m.index.json"), load_file)


def test_normalize_waveform_closed_form():
    from icode import normalize_waveform
    torch.manual_seed(3)
    wave = torch.randn(2, 1000) * 0.2 + 0.5
    att = torch.ones(2, 1000, dtype=torch.bool)
    att[1, 600:] = False
    out = normalize_waveform(wave, att)
    for i, n in ((0, 1000), (1, 600)):
        x = out[i, :n].double()
        assert abs(x.mean().item()) < 1e-6 and abs(x.var(unbiased=False).item() - 1) < 1e-4
    assert (out[1, 600:] == 0).all()
    ref = wave[1, :600]
    assert torch.allclose(out[1, :600], (ref - ref.mean()) / torch.sqrt(ref.var(unbiased=False) + 1e-7), atol=1e-5)
    empty = normalize_waveform(wave, torch.zeros_like(att))            # a row with no valid sample: zeros, not NaN
    assert torch.equal(empty, torch.zeros_like(wave))


class _RunsCode:
    """Unpickling calls open(path, "w"): what a malicious checkpoint would do, harmlessly."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_convert_legacy_bin_to_safetensors(tmp_path):
    """`python icode.py convert IN.bin OUT_DIR`: the one pickle read (weights_only=True), tensors preserved."""
    from safetensors.torch import load_file

    import icode
    sd = {"a.weight": torch.randn(3, 4), "b.bias": torch.arange(5.0)}
    src = tmp_path / "legacy"
    src.mkdir()
    torch.save(sd, src / "pytorch_model.bin")
    (src / "config.json").write_text('{"model_type": "deberta-v2"}')
    icode.main(["convert", str(src / "pytorch_model.bin"), str(tmp_path / "out")])
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert out.keys() == sd.keys() and all(torch.equal(out[k], sd[k]) for k in sd)
    assert (tmp_path / "out" / "config.json").read_text() == '{"model_type": "deberta-v2"}'
    torch.save({"not": "tensors"}, src / "bad.bin")
    with pytest.raises(ValueError, match="bad.bin"):
        icode.main(["convert", str(src / "bad.bin"), str(tmp_path / "out2")])
    (src / "text.bin").write_text("not a pickle")
    with pytest.raises(ValueError, match="text.bin: not loadable"):
        icode.main(["convert", str(src / "text.bin"), str(tmp_path / "out2")])
    # a pickle that runs code when unpickled (weights_only=False would run it): refused, nothing run
    ran = tmp_path / "ran"
    torch.save({"a.weight": _RunsCode(str(ran))}, src / "evil.bin")
    with pytest.raises(ValueError, match="evil.bin: not loadable as tensors with weights_only=True"):
        icode.main(["convert", str(src / "evil.bin"), str(tmp_path / "out3")])
    assert not ran.exists()
    # a sharded legacy checkpoint: the index names every shard, all merged into one file
    shards = tmp_path / "sharded"
    shards.mkdir()
    torch.save({"a.weight": sd["a.weight"]}, shards / "pytorch_model-00001-of-00002.bin")
    torch.save({"b.bias": sd["b.bias"]}, shards / "pytorch_model-00002-of-00002.bin")
    (shards / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {
        "a.weight": "pytorch_model-00001-of-00002.bin", "b.bias": "pytorch_model-00002-of-00002.bin"}}))
    (shards / "config.json").write_text("{}")
    from model.weights import read_hf_folder
    with pytest.raises(FileNotFoundError, match="convert .*pytorch_model.bin.index.json"):  # the hint
        read_hf_folder(str(shards))
    icode.main(["convert", str(shards / "pytorch_model.bin.index.json"), str(shards)])
    _, out = read_hf_folder(str(shards))
    assert out.keys() == sd.keys() and all(torch.equal(out[k], sd[k]) for k in sd)


@pytest.mark.parametrize("mode", ["merge", "co"])
def test_every_attention_call_can_use_a_fused_kernel(mode, monkeypatch):
    """SDPA's fused CUDA kernels (flash / memory-efficient / cuDNN) take 4-D q, k, v whose last dimension has
    stride 1, and a mask whose last dimension has stride 1 too (PyTorch's sdp_utils: check_tensor_shapes,
    check_last_dim_stride_equals_1_dense; "GPU backends require attn_mask's last dimension to have stride 1
    while the CPU does not"). A call that misses either silently runs the unfused math kernel, materialising
    every attention matrix (docs/speed.md). Check every call of a pretraining forward, including Swin's
    shifted windows (a per-window mask), its unshifted ones (the bias table gathered and permuted) and
    WavLM's gated bias."""
    import dataclasses

    import torch.nn.functional as F
    cfg = preset("tiny", mode)
    cfg.vision = dataclasses.replace(cfg.vision, depths=(2, 2, 1, 1))  # blocks 2 of stages 1, 2 are shifted
    torch.manual_seed(0)
    model = ICode(cfg).eval()
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append(((q.dim(), k.dim(), v.dim(), None if attn_mask is None else attn_mask.dim()),
                      tuple(t.stride(-1) for t in (q, k, v, attn_mask) if t is not None)))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    b = subset_batch(model, MODALITIES)
    feats, valids = model.pretrain_features(b, masked=True)
    model.masked_unit_logits(feats, valids, model.targets(b))
    n_fusion = cfg.fusion.layers * (1 if cfg.fusion.mode == "merge" else 6)  # co: 3 self + 3 cross per layer
    expected = cfg.text.num_hidden_layers + cfg.speech.num_hidden_layers + sum(cfg.vision.depths) + n_fusion
    assert len(calls) == expected
    bad = [dims for dims, _ in calls if dims[:3] != (4, 4, 4) or (dims[3] is not None and dims[3] > 4)]
    assert not bad, f"{len(bad)} of {len(calls)} attention calls are not 4-D: {bad[:3]}"
    strided = [strides for _, strides in calls if set(strides) != {1}]
    assert not strided, f"{len(strided)} of {len(calls)} calls have a last dimension at stride != 1 (q, k, v, mask): {strided[:3]}"
