"""i-Code's modules (section 4.1): the single-modality encoders (deberta.py, wavlm.py, swin3d.py), the fusion
network (fusion.py), the masked-unit heads (heads.py), the frozen target tokenizers (quantizers.py), and the
loading of public checkpoints (weights.py; `load_encoder` below picks the encoder)."""
from model.deberta import load_deberta
from model.quantizers import load_quantizer  # noqa: F401
from model.swin3d import inflate_image_swin, load_video_swin
from model.wavlm import load_speech_encoder

ENCODER_KINDS = ("deberta-v3", "wavlm", "hubert", "swin", "video-swin")


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
