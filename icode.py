"""i-Code (Yang et al. 2022): vision, language and speech fused into one representation.

This file assembles the model of section 4.1 and Figure 1 (left):

    video [B, 3, T, H, W] --Video Swin--> [B, T_v, H_v, W_v, C_v] --+
    text  [B, T_l]        --DeBERTa-V3--> [B, T_l, C_l]            --+--> projections --> fusion (merge / co)
    audio [B, N]          --WavLM-------> [B, T_s, C_s]            --+        --> per-modality fused tokens
                                                                               --> pooled representations
and the pretraining forward of section 4.2 (masked units modelling + cross-modality contrastive).

Letters used in shape comments everywhere (docs/CONVENTIONS.md):
    B batch; T frames, H, W pixels; T_v, H_v, W_v = T/2, H/32, W/32 the vision encoder's grid;
    T_l text tokens; N audio samples at 16 kHz; T_s speech frames (20 ms); C an encoder width;
    D the fusion width; M masked positions selected for a loss.

    python icode.py info --preset paper        # parameter counts beside the paper's
    python icode.py convert IN.bin OUT_DIR     # legacy pytorch_model.bin (or its .index.json) -> model.safetensors
    python icode.py export CKPT OUT_DIR        # a checkpoint's model as config.json + model.safetensors
"""
import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from safetensors.torch import load_model as load_safetensors_into
from safetensors.torch import save_model

from data import tube_to_patch_mask
from losses import PAIR_NAMES, WEIGHT_OF, LearnedLossWeights, LogitScales
from model.deberta import DEBERTA_V3_BASE, Deberta, DebertaConfig
from model.fusion import MODALITIES, FusionConfig, FusionNetwork, joint_representation, masked_mean
from model.heads import MLMHead, MSMHead, MVMHead, select_masked
from model.quantizers import (VQGANTokenizer, Wav2Vec2Quantizer, build_default_quantizers, fingerprint, load_quantizer,
                              vqgan_config_from_dict, wav2vec2_config_from_hf)
from model.swin3d import SWIN_B_VIDEO, SwinConfig, VideoSwin
from model.wavlm import WAVLM_LARGE, SpeechConfig, SpeechEncoder

# Fields added after the first checkpoints were written, with the value that reproduces what a checkpoint
# without the field did: from_dict fills them in, so a loaded or resumed model computes what it was trained on.
FIELDS_ADDED_LATER = {"normalize_audio": False, "video_tokenizer": None, "speech_tokenizer": None,
                      "learned_loss_weights": False}


@dataclass
class ICodeConfig:
    text: DebertaConfig = field(default_factory=lambda: DEBERTA_V3_BASE)   # language encoder (DeBERTa-V3-base)
    speech: SpeechConfig = field(default_factory=lambda: WAVLM_LARGE)      # speech encoder (WavLM-large)
    vision: SwinConfig = field(default_factory=lambda: SWIN_B_VIDEO)       # vision encoder (Video Swin-B)
    fusion: FusionConfig = field(default_factory=FusionConfig)             # fusion network (section 4.1)
    video_codebook: int = 8192     # visual token vocabulary V_c (PeCo's codebook, appendix A.1 eq. (5))
    speech_groups: int = 2         # wav2vec 2.0 quantizer: G codebook groups ...
    speech_vars: int = 320         # ... of V entries each (Baevski et al. 2020)
    msm_combined: bool = False     # MSM predicts the combined id i0*V+i1 (V^G classes) instead of per group
    tie_mlm: bool = False          # tie the MLM decoder to the text encoder's word embeddings (needs C_l == D)
    tokenizer_seed: int = 0        # seed of the default random-projection (BEST-RQ) target tokenizers
    video_tokenizer: dict = None   # a pretrained VQGAN target tokenizer's architecture (VQGANConfig fields; PeCo's
                                   # family), its frozen weights part of the model's; None = the random projection
    speech_tokenizer: dict = None  # the same for a wav2vec 2.0 quantizer (Wav2Vec2QuantizerConfig fields), the
                                   # paper's speech targets (section 4.2.1); both set by `pretrained_targets`
    speech_tokenizer_features: str = "logmel"  # BEST-RQ speech input: "logmel" or "wave"
    normalize_audio: bool = True   # zero mean, unit variance per utterance before the speech encoder, as the
                                   # WavLM-large / HuBERT-large feature extractors do (do_normalize=True)
    learned_loss_weights: bool = False  # eq. (3) with learned weights (losses.LearnedLossWeights) instead of the
                                        # paper's fixed alpha, beta, gamma, lambda (section 4.2.2 tried both)

    @staticmethod
    def from_dict(d):
        """Inverse of dataclasses.asdict (checkpoints store the config as JSON); fields the dict lacks take
        the behaviour of the code that wrote it (FIELDS_ADDED_LATER), others their defaults."""
        d = {**FIELDS_ADDED_LATER, **d}
        sub = {"text": DebertaConfig, "speech": SpeechConfig, "vision": SwinConfig, "fusion": FusionConfig}
        for k, cls in sub.items():
            if k in d:
                names = {f.name: f for f in dataclasses.fields(cls)}
                unknown = set(d[k]) - set(names)
                if unknown:
                    raise ValueError(f"config field {k!r} has unknown keys {sorted(unknown)}")
                d[k] = cls(**{n: tuple(v) if isinstance(v, list) and n != "pos_att_type" else v
                              for n, v in d[k].items()})
        unknown = set(d) - {f.name for f in dataclasses.fields(ICodeConfig)}
        if unknown:
            raise ValueError(f"unknown ICodeConfig keys {sorted(unknown)}")
        return ICodeConfig(**d)


def checkpoint_config(path):
    """The ICodeConfig of a checkpoint folder: config.json (an exported folder) or the "config" of train.py's
    state.json. Fields the file lacks take what the code that wrote it did (FIELDS_ADDED_LATER)."""
    for name, key in (("config.json", None), ("state.json", "config")):
        p = os.path.join(path, name)
        if os.path.isfile(p):
            with open(p) as f:
                try:
                    d = json.load(f)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{p}: not valid JSON ({e})") from None
            if key is not None and key not in d:
                raise ValueError(f"{p} has no {key!r}: not a train.py checkpoint")
            return ICodeConfig.from_dict(d if key is None else d[key])
    raise FileNotFoundError(f"{path!r} has neither config.json nor state.json: not an i-Code checkpoint folder")


def target_tokenizers(cfg: ICodeConfig, video=None, speech=None):
    """The frozen target tokenizers of section 4.2.1 for a config: (video, speech). Where the config holds a
    pretrained one's architecture (cfg.video_tokenizer / cfg.speech_tokenizer), `video` / `speech` is that
    tokenizer, loaded (`pretrained_targets`); without it one is built with the architecture alone, whose weights
    a checkpoint then fills in (`train.load_model`). Otherwise the random projections (BEST-RQ; README,
    "Differences from the paper"). ICode's own, and those `python -m pipeline tokenize` writes offline caches with, so
    the two always agree. Their codebooks must fit the heads and their grids the model's."""
    rp_video, rp_speech = build_default_quantizers(cfg.tokenizer_seed, cfg.video_codebook, cfg.speech_vars,
                                                   cfg.speech_groups, speech_features=cfg.speech_tokenizer_features)
    video = _pretrained("video", video, cfg.video_tokenizer, vqgan_config_from_dict, VQGANTokenizer, rp_video)
    speech = _pretrained("speech", speech, cfg.speech_tokenizer, wav2vec2_config_from_hf, Wav2Vec2Quantizer,
                         rp_speech)
    if cfg.video_tokenizer is not None and (video.codebook_size != cfg.video_codebook or video.patch != 16):
        raise ValueError(f"video tokenizer: {video.codebook_size} codes on {video.patch}-pixel patches, the MVM "
                         f"head predicts {cfg.video_codebook} codes on 16-pixel patches (icode.pretrained_targets "
                         f"sizes the head)")
    if cfg.speech_tokenizer is not None:
        frames = (tuple(speech.config.conv_kernel), tuple(speech.config.conv_stride))
        own = (tuple(cfg.speech.conv_kernel), tuple(cfg.speech.conv_stride))
        if (speech.groups, speech.vars) != (cfg.speech_groups, cfg.speech_vars) or frames != own:
            raise ValueError(f"speech tokenizer: {speech.groups} x {speech.vars} codes on frames of kernels / "
                             f"strides {frames}, the MSM head predicts {cfg.speech_groups} x {cfg.speech_vars} "
                             f"codes on the speech encoder's frames {own}")
    return video, speech


def _pretrained(name, given, arch, parse, build, default):
    """The pretrained tokenizer a config's architecture dict `arch` describes: `given` (loaded) or, without
    it, `build(parse(arch))` with random frozen weights for a checkpoint to fill in; `default` (the random
    projection) when arch is None."""
    if arch is None:
        if given is not None:
            raise ValueError(f"a pretrained {name} tokenizer was given, but the config has no {name}_tokenizer "
                             f"architecture: build the config with icode.pretrained_targets' fields")
        return default
    arch = parse(arch)
    tok = given if given is not None else build(arch)
    if tok.config != arch:
        raise ValueError(f"{name} tokenizer: its architecture {tok.config} is not the config's {arch}")
    return tok


def target_fingerprint(cfg: ICodeConfig, video, speech):
    """What decides a model's target ids, hashed (`model.quantizers.fingerprint`): the two tokenizers and the
    speech input's normalisation. An offline cache carries its writer's; train.py compares it with the model's."""
    return fingerprint(video, speech, settings={"normalize_audio": cfg.normalize_audio})


def pretrained_targets(video=None, speech=None):
    """Load pretrained target tokenizers from their folders (None: keep the random projection): a VQGAN for the
    MVM targets, a Wav2Vec2ForPreTraining checkpoint's quantizer for the MSM targets (`model.load_quantizer`).
    Returns (ICodeConfig fields: their architectures and the head sizes their codebooks need, {"video": ...,
    "speech": ...} the loaded tokenizers). `ICode(replace(cfg, **fields), tokenizers=toks)`."""
    fields, toks = {}, {}

    def arch(tok):  # its config as plain JSON, as a checkpoint's state.json holds it
        return json.loads(json.dumps(dataclasses.asdict(tok.config)))
    if video:
        toks["video"] = load_quantizer("vqgan", video)
        fields.update(video_tokenizer=arch(toks["video"]), video_codebook=toks["video"].codebook_size)
    if speech:
        toks["speech"] = load_quantizer("wav2vec2", speech)
        fields.update(speech_tokenizer=arch(toks["speech"]), speech_groups=toks["speech"].groups,
                      speech_vars=toks["speech"].vars)
    return fields, toks


def tokenize_targets(batch, cfg: ICodeConfig, video_tokenizer, speech_tokenizer):
    """Target ids of the unmasked inputs of a collated batch (section 4.2.1), for its video and audio:
    {"video_targets": [B, T, H/16, W/16], "audio_targets": [B, T_s, G]} (long). The speech tokenizer sees the
    waveform the speech encoder sees (normalised per utterance when cfg.normalize_audio; a wav2vec 2.0
    quantizer's own feature extractor normalises too)."""
    out = {}
    with torch.no_grad():
        if "video" in batch["modalities"]:
            out["video_targets"] = video_tokenizer(batch["video"])
        if "audio" in batch["modalities"]:
            audio = batch["audio"]
            if cfg.normalize_audio:
                audio = normalize_waveform(audio, batch.get("audio_attention"))
            out["audio_targets"] = speech_tokenizer(audio)
    return out


def normalize_waveform(wave, attention=None, eps=1e-7):
    """Zero mean, unit variance over each row's valid samples; padding stays 0 (Hugging Face's
    `Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm`). wave: [B, N]; attention: [B, N] (1 = real) or None."""
    valid = torch.ones_like(wave, dtype=torch.bool) if attention is None else attention.bool()
    w = valid.to(wave.dtype)
    n = w.sum(-1, keepdim=True).clamp_min(1)
    mean = (wave * w).sum(-1, keepdim=True) / n
    var = ((wave - mean) ** 2 * w).sum(-1, keepdim=True) / n
    return (wave - mean) / torch.sqrt(var + eps) * w


def preset(name, fusion_mode="merge", text_vocab=None):
    """'paper': the encoders and fusion of section 4.1 (merge: 6 layers, co: 3 layers, width 768).
    'tiny': the same architecture at toy width, a CPU training step well under a second."""
    if name == "paper":
        layers = 6 if fusion_mode == "merge" else 3
        cfg = ICodeConfig(fusion=FusionConfig(mode=fusion_mode, dim=768, layers=layers, heads=12))
    elif name == "tiny":
        cfg = ICodeConfig(
            # No dropout at toy scale: the encoders train from scratch for a few hundred steps.
            text=DebertaConfig(vocab_size=1024, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=128, max_position_embeddings=128, position_buckets=32,
                               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
            speech=SpeechConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                conv_dim=(32,) * 7, conv_bias=True, feat_extract_norm="layer",
                                do_stable_layer_norm=True, num_conv_pos_embeddings=16,
                                num_conv_pos_embedding_groups=4, num_buckets=32, max_bucket_distance=100,
                                hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0),
            vision=SwinConfig(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), window_size=(2, 4, 4),
                              drop_path_rate=0.0),
            fusion=FusionConfig(mode=fusion_mode, dim=64, layers=2 if fusion_mode == "merge" else 1, heads=4,
                                dropout=0.0),
            video_codebook=256, speech_groups=2, speech_vars=64)
    else:
        raise ValueError(f"preset must be 'paper' or 'tiny', got {name!r}")
    if text_vocab is not None:
        cfg.text = dataclasses.replace(cfg.text, vocab_size=text_vocab)
    return cfg


@dataclass
class EncodeOutput:
    tokens: dict      # {modality: fused tokens [B, L_m, D]} (video flattened T_v, H_v, W_v)
    valid: dict       # {modality: [B, L_m] bool or None}
    pooled: dict      # {modality: mean of its fused tokens over valid positions [B, D]}
    joint: torch.Tensor  # [B, D] the multimodal representation: mean of the per-modality means (section 5.2)


class ICode(nn.Module):
    def __init__(self, cfg: ICodeConfig, text=None, vision=None, speech=None, tokenizers=None):
        """Encoders given (text, vision, speech: loaded, `model.load_encoder`) or built from the config;
        tokenizers: {"video", "speech"} loaded pretrained target tokenizers (`pretrained_targets`)."""
        super().__init__()
        self.cfg = cfg
        self.text = text if text is not None else Deberta(cfg.text)
        self.vision = vision if vision is not None else VideoSwin(cfg.vision)
        self.speech = speech if speech is not None else SpeechEncoder(cfg.speech)
        dims = {"video": self.vision.hidden_size, "text": self.text.hidden_size, "audio": self.speech.hidden_size}
        self.fusion = FusionNetwork(cfg.fusion, dims)
        D = cfg.fusion.dim
        tie = None
        if cfg.tie_mlm:
            if self.text.hidden_size != D:
                raise ValueError(f"tie_mlm needs the text width ({self.text.hidden_size}) == fusion dim ({D})")
            tie = self.text.word_embeddings.weight
        self.mlm_head = MLMHead(D, cfg.text.vocab_size, embedding_weight=tie)
        self.mvm_head = MVMHead(D, cfg.video_codebook)
        self.msm_head = MSMHead(D, groups=cfg.speech_groups, vars=cfg.speech_vars, combined=cfg.msm_combined)
        self.logit_scales = LogitScales()
        self.loss_weights = LearnedLossWeights() if cfg.learned_loss_weights else None   # eq. (3), learned
        # Frozen target tokenizers (section 4.2.1): pretrained ones where the config has their architectures,
        # BEST-RQ random projections otherwise (README, "Differences from the paper").
        self.video_tokenizer, self.speech_tokenizer = target_tokenizers(cfg, **(tokenizers or {}))

    @classmethod
    def from_encoders(cls, text, vision, speech, fusion=None, tokenizers=None, **kw):
        """Build i-Code around loaded encoders (e.g. `model.load_encoder(...)`); returns train mode."""
        cfg = ICodeConfig(text=text.config, vision=vision.config, speech=speech.config,
                          fusion=fusion or FusionConfig(), **kw)
        return cls(cfg, text=text, vision=vision, speech=speech, tokenizers=tokenizers).train()

    @classmethod
    def from_checkpoint(cls, path):
        """A trained model from a checkpoint folder, in eval mode: train.py's `ckpt_XXXXXXX/` or the weights-only
        folder `python icode.py export` writes. The architecture comes from its config (`checkpoint_config`),
        every tensor from its model.safetensors (a missing or unexpected one is an error naming it)."""
        model = cls(checkpoint_config(path))
        weights = os.path.join(path, "model.safetensors")
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"{path!r} has no model.safetensors")
        missing, unexpected = load_safetensors_into(model, weights, strict=False)
        if missing or unexpected:
            raise KeyError(f"{weights}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return model.eval()

    # ---- the four modules of section 4.1 ----

    def encode_modalities(self, video=None, text=None, audio=None, text_attention=None, audio_attention=None,
                          video_patch_mask=None, audio_frame_mask=None):
        """Single-modality encoders. Returns ({m: features}, {m: valid}) for the given modalities.

        video_patch_mask: [B, T/2, H/4, W/4] bool, masked patches replaced by the mask embedding (A.1).
        audio_frame_mask: [B, T_s] bool, masked frames replaced by the speech mask embedding (MSM).
        """
        feats, valids = {}, {}
        if video is not None:
            feats["video"], _ = self.vision(video, patch_mask=video_patch_mask)      # (B, T_v, H_v, W_v, C_v)
            valids["video"] = None
        if text is not None:
            feats["text"], valids["text"] = self.text(text, text_attention)         # (B, T_l, C_l)
        if audio is not None:
            if self.cfg.normalize_audio:
                audio = normalize_waveform(audio, audio_attention)
            feats["audio"], valids["audio"] = self.speech(audio, audio_attention, frame_mask=audio_frame_mask)
        if not feats:
            raise ValueError("give at least one of video, text, audio")
        return feats, valids

    def encode(self, video=None, text=None, audio=None, text_attention=None, audio_attention=None):
        """Fuse whatever subset of modalities is given (section 4.1). Returns `EncodeOutput`.

        The joint representation averages the per-modality means (each present modality weighs the same,
        whatever its length; section 5.2 "the average of the outputs from the fusion network").
        """
        feats, valids = self.encode_modalities(video, text, audio, text_attention, audio_attention)
        tokens = self.fusion(feats, valids)
        pooled = {m: masked_mean(x, valids[m]) for m, x in tokens.items()}
        return EncodeOutput(tokens, {m: valids[m] for m in tokens}, pooled, joint_representation(tokens, valids))

    def contrastive_representations(self, feats, valids):
        """Section 4.2.2: each modality through the fusion network *alone*, then mean-pooled (vision over
        time and space). Returns {m: r_m [B, D]}."""
        return {m: masked_mean(self.fusion({m: feats[m]}, {m: valids[m]})[m], valids[m]) for m in feats}

    # ---- pretraining (section 4.2) ----

    @torch.no_grad()
    def targets(self, batch):
        """Discrete targets of the masked units (section 4.2.1), labels -100 where nothing is predicted.

        Returns a dict with "text" [B, T_l] (the MLM labels of the collator), "video" [B, T, H/16, W/16]
        (visual token ids at tube-masked positions) and "audio" [B, T_s, G] (speech token ids at
        span-masked frames; [B, T_s] from a cache of combined ids, for `msm_combined`), for the modalities in
        the batch. Ids come from the batch's offline cache ("video_targets", "audio_targets") when present, else
        from the frozen tokenizers on the unmasked input.
        """
        m = batch["modalities"]
        cached = {k: batch[f"{k}_targets"] for k in ("video", "audio") if batch.get(f"{k}_targets") is not None}
        missing = [k for k in ("video", "audio") if k in m and k not in cached]
        made = tokenize_targets(dict(batch, modalities=missing), self.cfg, self.video_tokenizer,
                                self.speech_tokenizer) if missing else {}
        out = {}
        if "text" in m:
            out["text"] = batch["text_labels"]
        if "video" in m:
            ids = cached.get("video", made.get("video_targets"))
            out["video"] = torch.where(batch["video_mask"], ids, torch.full_like(ids, -100))
        if "audio" in m:
            ids = cached.get("audio", made.get("audio_targets"))
            mask = batch["audio_mask"][..., :ids.shape[1]]
            if mask.shape != ids.shape[:2]:
                raise ValueError(f"audio mask {tuple(batch['audio_mask'].shape)} does not cover the "
                                 f"{ids.shape[1]} speech-token frames")
            keep = mask if ids.dim() == 2 else mask[..., None]   # combined ids [B, T_s] or per group [B, T_s, G]
            out["audio"] = torch.where(keep, ids, torch.full_like(ids, -100))
        return out

    def pretrain_features(self, batch, masked=True):
        """Encoders on the (masked) inputs of a collated batch (data.collate)."""
        m = batch["modalities"]
        text = None
        if "text" in m:
            text = batch["text_ids"] if masked else batch.get("text_ids_clean", batch["text_ids"])
        return self.encode_modalities(
            video=batch["video"] if "video" in m else None,
            text=text,
            audio=batch["audio"] if "audio" in m else None,
            text_attention=batch.get("text_attention"), audio_attention=batch.get("audio_attention"),
            video_patch_mask=tube_to_patch_mask(batch["video_mask"]) if masked and "video" in m else None,
            audio_frame_mask=batch["audio_mask"] if masked and "audio" in m else None)

    def masked_unit_logits(self, feats, valids, targets, select=None):
        """Merged fusion pass -> MLM / MVM / MSM heads on masked positions only.
        select: None, or {"text" | "video" | "audio": a row selection (x, labels) -> (x [M, D], labels [M])} in
        place of the heads' own (`model.heads.select_masked`); train.py passes the fixed-size one of
        training/static_rows.py under CUDA graphs.
        Returns {"mlm" | "mvm" | "msm": (logits [M, V], labels [M])} for the modalities present."""
        fused = self.fusion(feats, valids)
        pick = {**{m: select_masked for m in MODALITIES}, **(select or {})}
        out = {}
        if "text" in fused:
            out["mlm"] = self.mlm_head(fused["text"], targets["text"], pick["text"])
        if "video" in fused:
            B, T_v, H_v, W_v, _ = feats["video"].shape
            out["mvm"] = self.mvm_head(fused["video"].reshape(B, T_v, H_v, W_v, -1), targets["video"], pick["video"])
        if "audio" in fused:
            out["msm"] = self.msm_head(fused["audio"], targets["audio"], pick["audio"])
        return out

    def unused_parameters(self, present):
        """The trainable parameters a pretraining step on a batch holding only `present` modalities
        does not touch: the absent encoders, their projections and heads, co-attention's modules of
        absent modalities (and every cross-attention when one modality is alone), the logit scales of
        absent pairs, the learned eq. (3) weights of absent terms. train.py joins them to the graph with a
        zero coefficient (so DDP needs no `find_unused_parameters`) and then drops their gradients (so AdamW
        leaves them alone).
        tests/test_icode.py checks this list against autograd for every subset."""
        present = set(present)
        mods = []
        absent = [m for m in MODALITIES if m not in present]
        encoder = {"video": self.vision, "text": self.text, "audio": self.speech}
        head = {"video": self.mvm_head, "text": self.mlm_head, "audio": self.msm_head}
        for m in absent:
            mods += [encoder[m], self.fusion.proj[m], head[m]]
            if self.cfg.fusion.mode == "co":
                for layer in self.fusion.layers:
                    mods += [layer.self_attn[m], layer.self_norm[m], layer.cross_attn[m], layer.cross_norm[m],
                             layer.ffn_norm[m]] + ([layer.ffn[m]] if self.cfg.fusion.co_ffn_per_modality else [])
        if self.cfg.fusion.mode == "co" and len(present) == 1:
            for layer in self.fusion.layers:
                mods += [layer.cross_attn[m] for m in present] + [layer.cross_norm[m] for m in present]
        params = [p for mod in mods for p in mod.parameters()]
        params += [self.logit_scales.scale[name] for pair, name in PAIR_NAMES.items() if not set(pair) <= present]
        if self.loss_weights is not None:   # the learned weights of the terms this batch lacks
            terms = {"mlm": "text" in present, "mvm": "video" in present, "msm": "audio" in present,
                     **{name: set(pair) <= present for pair, name in PAIR_NAMES.items()}}
            used = {WEIGHT_OF[k] for k, on in terms.items() if on}
            params += [s for w, s in self.loss_weights.s.items() if w not in used]
        seen, out = set(), []
        for p in params:  # de-duplicated: a shared co-attention FFN or a tied decoder appears once
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out


def count_params(module):
    return sum(p.numel() for p in module.parameters())


PAPER_COUNTS = {"text": 183e6, "vision": 91e6, "audio": 315e6, "fusion_merge": 154e6, "fusion_co": 163e6}


def info(preset_name):
    """Parameter counts per module beside the paper's (section 4.1)."""
    rows = []
    for mode in ("merge", "co"):
        with torch.device("meta"):           # count without allocating (the paper preset is ~750M)
            m = ICode(preset(preset_name, mode))
        heads = count_params(m.mlm_head) + count_params(m.mvm_head) + count_params(m.msm_head)
        fusion = count_params(m.fusion)
        if mode == "merge":
            rows += [("language encoder (DeBERTa-V3)", count_params(m.text), PAPER_COUNTS["text"]),
                     ("vision encoder (Video Swin)", count_params(m.vision), PAPER_COUNTS["vision"]),
                     ("speech encoder (WavLM)", count_params(m.speech), PAPER_COUNTS["audio"])]
        rows += [(f"fusion, {mode}-attention: projections + layers", fusion, None),
                 ("  + MLM/MVM/MSM heads", fusion + heads, PAPER_COUNTS[f"fusion_{mode}"])]
    print(f"{'module':52s} {'this code':>12s} {'paper':>10s}")
    for name, n, paper in rows:
        print(f"{name:52s} {n / 1e6:11.1f}M {'' if paper is None else f'{paper / 1e6:9.0f}M':>10s}")
    print("\nNotes: the paper's fusion counts (154M merge, 163M co) are matched only when the masked-unit heads\n"
          "are counted with the fusion layers: 6 width-768 layers alone are ~43M, and the untied MLM decoder\n"
          "over DeBERTa-V3's 128k vocabulary is ~99M of the rest. Co-attention here shares the feed-forward\n"
          "sublayer across modalities (FusionConfig.co_ffn_per_modality=False); per-modality FFNs add 28M.\n"
          "The vision encoder is Video Swin-B (the paper's CoSwin is not public); the speech encoder\n"
          "WavLM-large as in the paper; DeBERTa-V3-base includes its 98M-parameter embedding matrix.")


def export(ckpt, out_dir):
    """A weights-only folder of a checkpoint (train.py's ckpt_XXXXXXX/, or another export): config.json (the
    ICodeConfig) and model.safetensors, which `ICode.from_checkpoint(out_dir)` loads. Returns out_dir."""
    model = ICode.from_checkpoint(ckpt)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json.tmp"), "w") as f:
        json.dump(dataclasses.asdict(model.cfg), f, indent=1)
    save_model(model, os.path.join(out_dir, "model.safetensors.tmp"))
    os.replace(os.path.join(out_dir, "model.safetensors.tmp"), os.path.join(out_dir, "model.safetensors"))
    os.replace(os.path.join(out_dir, "config.json.tmp"), os.path.join(out_dir, "config.json"))
    return out_dir


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("info", help="parameter counts per module beside the paper's")
    q.add_argument("--preset", default="paper", choices=["paper", "tiny"], help="model size")
    q = sub.add_parser("convert", help="turn a legacy pytorch_model.bin into model.safetensors (no pickle after)")
    q.add_argument("bin", help="path of pytorch_model.bin (or of pytorch_model.bin.index.json: all its shards)")
    q.add_argument("out_dir", help="folder to write model.safetensors (and config.json) into")
    q = sub.add_parser("export", help="a checkpoint's model as a weights-only folder (config.json + model.safetensors)")
    q.add_argument("ckpt", help="a checkpoint folder (train.py's ckpt_XXXXXXX/)")
    q.add_argument("out_dir", help="folder to write config.json and model.safetensors into")
    a = p.parse_args(argv)
    if a.cmd == "info":
        info(a.preset)
    elif a.cmd == "export":
        print(export(a.ckpt, a.out_dir))
    else:
        from model.weights import convert_bin_to_safetensors
        print(convert_bin_to_safetensors(a.bin, a.out_dir))


if __name__ == "__main__":
    main()
