"""model/deberta.py against Hugging Face's DebertaV2 (small random models, CPU)."""
import math
import os
import re

import pytest
import torch
from common import assert_attention_dropout_only_in_training, perturbed
from safetensors.torch import load_file, save_file
from transformers import DebertaV2Config, DebertaV2ForMaskedLM, DebertaV2Model
from transformers.models.deberta_v2.modeling_deberta_v2 import make_log_bucket_position

from model.deberta import (DEBERTA_V3_BASE, Deberta, DebertaConfig, config_from_hf, load_deberta, log_bucket_position,
                           save_hf_folder)


def small_hf_config(position_buckets=32, max_position_embeddings=64, **kw):
    kw = dict(dict(relative_attention=True, pos_att_type=["p2c", "c2p"]), **kw)
    return DebertaV2Config(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=max_position_embeddings, position_buckets=position_buckets, norm_rel_ebd="layer_norm",
        share_att_key=True, position_biased_input=False, max_relative_positions=-1, type_vocab_size=0,
        layer_norm_eps=1e-7, **kw)


def save_hf(tmp_path, model_cls=DebertaV2Model, **kw):
    torch.manual_seed(0)
    hf = model_cls(small_hf_config(**kw)).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    return hf


def padded_batch(T=12, lengths=(12, 7, 3), vocab=100):
    torch.manual_seed(1)
    ids = torch.randint(1, vocab, (len(lengths), T))
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    return ids.masked_fill(mask == 0, 0), mask


def assert_matches_hf(hf, ours, ids, mask):
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        out, valid = ours(ids, mask)
    assert out.shape == ref.shape and valid.dtype == torch.bool
    assert torch.equal(valid, mask.bool())
    torch.testing.assert_close(out[valid], ref[valid], atol=1e-5, rtol=1e-5)


def test_matches_hf_with_padding(tmp_path):
    hf = save_hf(tmp_path)
    ours = load_deberta(str(tmp_path))
    assert not ours.training and ours.hidden_size == 64
    assert ours.word_embeddings is ours.embeddings.word_embeddings
    assert_matches_hf(hf, ours, *padded_batch())
    # no attention_mask: everything valid
    ids, _ = padded_batch()
    with torch.no_grad():
        out, valid = ours(ids)
    assert valid.all()
    torch.testing.assert_close(out, hf(input_ids=ids).last_hidden_state, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("max_positions", [64, 16])
def test_longer_than_position_buckets(tmp_path, max_positions):
    """40 tokens in 8 log buckets; with max_position_embeddings 16 the distances pass the largest bucket and
    the relative-position index is clamped to the table (as HF's)."""
    hf = save_hf(tmp_path, position_buckets=8, max_position_embeddings=max_positions)
    ours = load_deberta(str(tmp_path))
    assert_matches_hf(hf, ours, *padded_batch(T=40, lengths=(40, 25)))


def test_prefixed_checkpoint_heads_unused(tmp_path, capsys):
    hf = save_hf(tmp_path, model_cls=DebertaV2ForMaskedLM)
    keys = load_file(os.path.join(tmp_path, "model.safetensors")).keys()
    assert any(k.startswith("deberta.") for k in keys)
    ours = load_deberta(str(tmp_path))
    printed = capsys.readouterr().out
    assert "unused" in printed and ("cls." in printed or "lm_predictions." in printed)
    assert_matches_hf(hf.deberta, ours, *padded_batch())


def _rewrite(tmp_path, edit):
    path = os.path.join(tmp_path, "model.safetensors")
    sd = load_file(path)
    edit(sd)
    save_file({k: v.contiguous() for k, v in sd.items()}, path)


def test_missing_key_names_it(tmp_path):
    save_hf(tmp_path)
    key = "encoder.layer.1.attention.self.key_proj.weight"
    _rewrite(tmp_path, lambda sd: sd.pop(key))
    named = re.escape(str(tmp_path)) + r": missing tensor\(s\) \[.*layer\.1\.attention\.self\.key_proj\.weight"
    with pytest.raises(KeyError, match=named):
        load_deberta(str(tmp_path))


def test_wrong_shape_names_it(tmp_path):
    save_hf(tmp_path)
    key = "encoder.rel_embeddings.weight"
    _rewrite(tmp_path, lambda sd: sd.__setitem__(key, torch.zeros(10, 64)))
    with pytest.raises(ValueError, match=key):
        load_deberta(str(tmp_path))


def test_sharded_checkpoint_loads_like_one_file(tmp_path):
    """The Hub stores large models as shards named by model.safetensors.index.json."""
    hf = save_hf(tmp_path / "one")
    hf.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="20KB")
    assert os.path.isfile(tmp_path / "sharded" / "model.safetensors.index.json")
    ids, mask = padded_batch()
    with torch.no_grad():
        ref, _ = load_deberta(str(tmp_path / "one"))(ids, mask)
        out, _ = load_deberta(str(tmp_path / "sharded"))(ids, mask)
    assert torch.equal(out, ref)
    shard = sorted(f for f in os.listdir(tmp_path / "sharded") if f.endswith(".safetensors"))[1]
    os.remove(tmp_path / "sharded" / shard)
    with pytest.raises(FileNotFoundError, match=shard):
        load_deberta(str(tmp_path / "sharded"))


def test_unreadable_files_and_configs_are_named(tmp_path):
    save_hf(tmp_path)
    st = os.path.join(tmp_path, "model.safetensors")
    with open(st, "r+b") as f:  # an interrupted download
        f.truncate(os.path.getsize(st) // 2)
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
        load_deberta(str(tmp_path))
    save_hf(tmp_path, hidden_act="gelu_python")
    with pytest.raises(ValueError, match=r"config.json: hidden_act='gelu_python'"):
        load_deberta(str(tmp_path))


def test_a_checkpoint_of_another_model_type_is_named(tmp_path):
    """load_encoder("deberta-v3", DIR) on a BERT folder names the model_type found and the one expected,
    before any tensor is compared (not "36 missing tensors")."""
    from transformers import BertConfig, BertModel

    from model import load_encoder
    BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=37)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"config.json: model_type 'bert': expected 'deberta-v2'"):
        load_encoder("deberta-v3", str(tmp_path))


@pytest.mark.parametrize("relative_attention,pos_att_type", [(False, ["p2c", "c2p"]), (True, ["p2c", "c2p", "p2p"]),
                                                             (True, ["c2p"])])
def test_attention_scale_counts_configured_terms_like_hf(tmp_path, relative_attention, pos_att_type):
    """The released code scales by 1/sqrt(d (1 + [c2p] + [p2c])) from pos_att_type, even without relative
    attention; other entries do not count."""
    hf = save_hf(tmp_path, relative_attention=relative_attention, pos_att_type=pos_att_type)
    assert_matches_hf(hf, load_deberta(str(tmp_path)), *padded_batch())


def test_padding_invariance():
    torch.manual_seed(0)
    cfg = config_from_hf(small_hf_config().to_dict())
    model = Deberta(cfg).eval()
    ids, mask = padded_batch()
    other = ids.masked_fill(mask == 0, 5)
    with torch.no_grad():
        a, valid = model(ids, mask)
        b, _ = model(other, mask)
    torch.testing.assert_close(a[valid], b[valid], atol=1e-6, rtol=1e-6)
    # a shorter sequence alone equals the same sequence padded inside a batch
    with torch.no_grad():
        alone, _ = model(ids[1:2, :7])
    torch.testing.assert_close(alone[0], a[1, :7], atol=1e-5, rtol=1e-5)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    model = Deberta(config_from_hf(small_hf_config().to_dict()))
    ids, mask = padded_batch()
    model.train()
    a, _ = model(ids, mask)
    b, _ = model(ids, mask)
    assert not torch.allclose(a, b)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask)[0], model(ids, mask)[0])


def test_attention_dropout_acts_in_training_only():
    """Attention-probability dropout alone (hidden dropout 0): in training it changes the output, in eval the
    network is the one without dropout (and in training with the rate set to 0, too)."""
    torch.manual_seed(0)
    cfg = small_hf_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.5)
    model = Deberta(config_from_hf(cfg.to_dict()))
    ids, mask = padded_batch()
    assert_attention_dropout_only_in_training(model, lambda m: m(ids, mask)[0], "attn_dropout", where=mask.bool())


def test_config_from_hf():
    d = small_hf_config().to_dict()
    d["pos_att_type"] = "p2c|c2p"
    cfg = config_from_hf(d)
    assert cfg.pos_att_type == ["p2c", "c2p"] and cfg.position_buckets == 32 and cfg.hidden_size == 64
    # missing fields take Hugging Face's defaults (not the V3 preset)
    bare = config_from_hf({"hidden_size": 64, "num_attention_heads": 4})
    assert bare.relative_attention is False and bare.position_biased_input is True and bare.pos_att_type == []
    # the V3-base preset
    assert (DEBERTA_V3_BASE.vocab_size, DEBERTA_V3_BASE.hidden_size, DEBERTA_V3_BASE.position_buckets) == (128100, 768, 256)


def _bucket_brute_force(r, buckets, max_position):
    mid = buckets // 2
    if abs(r) <= mid:  # near offsets stay exact
        return r
    v = math.ceil(math.log(abs(r) / mid) / math.log((max_position - 1) / mid) * (mid - 1)) + mid
    return int(math.copysign(v, r))


@pytest.mark.parametrize("buckets,max_position", [(256, 512), (8, 64), (32, 64), (64, 1024), (256, 2048)])
def test_log_bucket_position(buckets, max_position):
    rel = torch.arange(-2 * max_position, 2 * max_position + 1)
    ours = log_bucket_position(rel, buckets, max_position)
    brute = torch.tensor([_bucket_brute_force(r, buckets, max_position) for r in rel.tolist()])
    assert torch.equal(ours, make_log_bucket_position(rel, buckets, max_position).long())
    assert torch.equal(ours, brute)
    assert torch.equal(ours[rel.abs() <= buckets // 2], rel[rel.abs() <= buckets // 2])
    assert torch.equal(ours, -ours.flip(0))  # odd symmetry: bucket(-r) = -bucket(r)


# Writing our Deberta as a Hugging Face folder (model.save_encoder("deberta-v3", ...)).

def random_deberta(cfg):
    torch.manual_seed(0)
    return perturbed(Deberta(cfg))


SAVED_CONFIGS = {  # the V3 layout, and the V1/V2 options (absolute positions, segments, separate position projections)
    "v3": DebertaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64, position_buckets=32),
    "v2-options": DebertaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=96, max_position_embeddings=64, position_buckets=-1,
                                max_relative_positions=16, type_vocab_size=2, position_biased_input=True,
                                norm_rel_ebd="none", share_att_key=False, pos_att_type=["c2p"], hidden_act="gelu_new",
                                layer_norm_eps=1e-6, pad_token_id=3),
}


@pytest.mark.parametrize("name", sorted(SAVED_CONFIGS))
def test_save_hf_folder_loads_back_and_in_transformers(tmp_path, name):
    """Our Deberta written with save_hf_folder loads back through load_encoder("deberta-v3") with the same
    config, tensors and outputs, and transformers' DebertaV2Model.from_pretrained reads the same folder with no
    missing or unexpected tensor and computes our last hidden state."""
    import json

    from model import load_encoder, save_encoder
    model = random_deberta(SAVED_CONFIGS[name])
    assert save_encoder("deberta-v3", model, str(tmp_path)) == str(tmp_path)
    with open(tmp_path / "config.json") as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "deberta-v2" and cfg["architectures"] == ["DebertaV2Model"]
    assert isinstance(cfg["pos_att_type"], list) and cfg["pos_att_type"] == model.config.pos_att_type
    loaded = load_encoder("deberta-v3", str(tmp_path))
    assert loaded.config == model.config and not loaded.training
    ours_sd, back = model.state_dict(), loaded.state_dict()
    assert set(back) == set(ours_sd) and all(torch.equal(back[k], ours_sd[k]) for k in ours_sd)
    assert set(load_file(os.path.join(tmp_path, "model.safetensors"))) == set(ours_sd)
    ids, mask = padded_batch()
    with torch.no_grad():
        ref, _ = model(ids, mask)
        out, _ = loaded(ids, mask)
    assert torch.equal(out, ref)
    hf, info = DebertaV2Model.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert_matches_hf(hf.eval(), model, ids, mask)


def test_save_hf_folder_refuses_other_modules(tmp_path):
    with pytest.raises(TypeError, match="writes a Deberta, got a Linear"):
        save_hf_folder(torch.nn.Linear(2, 2), str(tmp_path))
