"""i-Code's modules (section 4.1): the single-modality encoders (deberta.py, wavlm.py, swin3d.py), the fusion
network (fusion.py), the masked-unit heads (heads.py), the frozen target tokenizers (quantizers.py), and the
loading of public checkpoints (weights.py; `load_encoder` below picks the encoder, `save_encoder` writes one of
ours in the same layout, `vision_kind` tells the two vision layouts apart)."""
import json
import os

from model.deberta import load_deberta
from model.deberta import save_hf_folder as save_deberta
from model.quantizers import load_quantizer  # noqa: F401
from model.swin3d import inflate_image_swin, load_video_swin, save_video_swin
from model.wavlm import load_speech_encoder
from model.wavlm import save_hf_folder as save_speech_encoder

ENCODER_KINDS = ("deberta-v3", "wavlm", "hubert", "swin", "video-swin")
WRITABLE_KINDS = ("deberta-v3", "wavlm", "hubert", "video-swin")  # "swin" is an image checkpoint: never ours
VISION_KINDS = {"swin": "swin", "swin3d": "video-swin"}  # config.json model_type -> load_encoder kind


def load_encoder(kind, path):
    """A pretrained single-modality encoder (section 4.1) from a Hugging Face-style folder, in eval mode.

    kind: "deberta-v3" (language), "wavlm" / "hubert" (speech; appendix A.4 swaps HuBERT in),
          "swin" (an image Swin checkpoint inflated to video, Liu et al. 2021b),
          "video-swin" (a Video Swin checkpoint in torchvision's swin3d layout).
    Calls: text enc(input_ids, attention_mask); speech enc(waveform [B, N], attention_mask);
    vision enc(video [B, 3, T, H, W]); each returns (last hidden state, valid mask or None).
    """
    if kind == "deberta-v3":
        return load_deberta(path)
    if kind in ("wavlm", "hubert"):
        enc = load_speech_encoder(path)
        if enc.config.gated_relative_position_bias != (kind == "wavlm"):
            raise ValueError(f"{path}: kind {kind!r} but config.json describes a "
                             f"{'WavLM' if enc.config.gated_relative_position_bias else 'HuBERT'} model")
        return enc
    if kind == "swin":
        return inflate_image_swin(path)
    if kind == "video-swin":
        return load_video_swin(path)
    raise ValueError(f"kind must be one of {ENCODER_KINDS}, got {kind!r}")


def save_encoder(kind, model, path):
    """Write one of our encoders to the folder `path` in the public layout `load_encoder(kind, path)` reads
    (config.json + model.safetensors), so an encoder pretrained here loads back exactly as a downloaded one.

    kind: "deberta-v3" (a Deberta, as a DebertaV2Model folder), "wavlm" / "hubert" (a SpeechEncoder with / without
    the gated relative position bias, as a WavLMModel / HubertModel folder), "video-swin" (a VideoSwin, in
    torchvision's swin3d layout, mask_token included). Returns `path`. A kind that cannot be written, or that
    contradicts the model (WavLM vs HuBERT), is a ValueError; a module of another type, a TypeError.
    """
    if kind == "deberta-v3":
        return save_deberta(model, path)
    if kind in ("wavlm", "hubert"):
        gated = getattr(getattr(model, "config", None), "gated_relative_position_bias", None)
        if gated is not None and gated != (kind == "wavlm"):
            raise ValueError(f"kind {kind!r} but the model is a {'WavLM' if gated else 'HuBERT'} "
                             f"(gated_relative_position_bias={gated})")
        return save_speech_encoder(model, path)
    if kind == "video-swin":
        return save_video_swin(model, path)
    raise ValueError(f"kind must be one of {WRITABLE_KINDS} to write an encoder, got {kind!r}"
                     + (" (an image Swin checkpoint, which we read but never write)" if kind == "swin" else ""))


def vision_kind(path):
    """The `load_encoder` kind of a vision checkpoint folder, from its config.json's model_type: "swin" (an
    image Swin, inflated to video) or "video-swin" (model_type "swin3d", a Video Swin)."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path!r} has no config.json")
    with open(cfg_path) as f:
        try:
            model_type = json.load(f).get("model_type")
        except (json.JSONDecodeError, AttributeError) as e:
            raise ValueError(f"{cfg_path}: not a JSON object ({e})") from None
    if model_type not in VISION_KINDS:
        raise ValueError(f"{cfg_path}: model_type {model_type!r} is not a vision checkpoint "
                         f"(expected one of {sorted(VISION_KINDS)})")
    return VISION_KINDS[model_type]
