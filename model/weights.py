"""Loading public encoder checkpoints (Hugging Face folder layout) through safetensors.

A checkpoint folder holds `config.json` (the architecture) and `model.safetensors` (the tensors).
`model/deberta.py` and `model/wavlm.py` each provide two functions (`model.load_encoder` picks the encoder):

    config_from_hf(cfg: dict) -> <Encoder>Config      # architecture from config.json
    convert_hf_state_dict(sd: dict) -> dict           # checkpoint key names -> this project's names

and `model/swin3d.py` their counterparts for an image Swin inflated to video, `config_from_hf(cfg,
temporal_patch, temporal_window)` and `convert_hf_image_state_dict(sd, cfg)`, and for torchvision's video
Swin, `convert_torchvision_state_dict(sd)`. This file does the rest: read, convert, strict load (a missing
or mis-shaped tensor is an error naming the key and both shapes; unused keys are listed once). No pickle:
the one exception is `convert_bin_to_safetensors`, behind `python icode.py convert IN.bin OUT_DIR`, with
weights_only=True.

The other way (`model.save_encoder`): each encoder file's writer (`save_hf_folder`, `save_video_swin`) turns
its module into the public config dict and key names, and `write_hf_folder` below writes the folder, so an
encoder we pretrain ourselves loads back through the same path as a downloaded one.
"""
import json
import os

import torch
from safetensors.torch import load_file, save_file


def _load_safetensors(path):
    try:
        return load_file(path)
    except Exception as e:  # a truncated or foreign file: safetensors' message does not name it
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def _load_shards(index_path, load):
    """One state dict from the shards a Hugging Face index names (`*.index.json`: {"weight_map": {tensor:
    file}}), each read by `load(path)`; a missing shard or a tensor in none of them is an error."""
    with open(index_path) as f:
        try:
            weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index_path}: not a shard index with a weight_map ({e!r})") from None
    folder = os.path.dirname(os.path.abspath(index_path))
    sd = {}
    for shard in sorted(set(weight_map.values())):
        path = os.path.join(folder, shard)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{index_path} names the shard {path}, which is missing")
        sd.update(load(path))
    if set(weight_map) - set(sd):
        raise KeyError(f"{index_path}: tensors {sorted(set(weight_map) - set(sd))[:5]} are in no shard")
    return sd


def read_hf_folder(path, parse_config=None):
    """Return (config, state dict) of a Hugging Face-style folder: `config.json` and `model.safetensors`, or the
    shards named by `model.safetensors.index.json` (how the Hub stores large models). With `parse_config`,
    the config is `parse_config(config dict)` and its errors name the folder's config.json."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint folder {path!r} does not exist")
    cfg_path = os.path.join(path, "config.json")
    st_path = os.path.join(path, "model.safetensors")
    index = st_path + ".index.json"
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path!r} has no config.json")
    if not os.path.isfile(st_path) and not os.path.isfile(index):
        legacy = [f for f in ("pytorch_model.bin.index.json", "pytorch_model.bin")
                  if os.path.isfile(os.path.join(path, f))]
        bins = sorted(f for f in os.listdir(path) if f.endswith(".bin"))
        hint = (f" Convert its {legacy[0]} with `python icode.py convert {os.path.join(path, legacy[0])} {path}`."
                if legacy else f" It has {bins}: convert the weights file with `python icode.py convert FILE {path}`."
                if bins else "")
        raise FileNotFoundError(f"{path!r} has no model.safetensors (nor model.safetensors.index.json).{hint}")
    with open(cfg_path) as f:
        try:
            cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    if parse_config is not None:
        try:
            cfg = parse_config(cfg)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{cfg_path}: {e}") from None
    if os.path.isfile(st_path):
        return cfg, _load_safetensors(st_path)
    return cfg, _load_shards(index, _load_safetensors)


def load_state_strict(module, state_dict, source="checkpoint", ignore_prefixes=()):
    """Copy `state_dict` into `module`, strictly.

    Raises KeyError for a parameter/buffer the module has and the checkpoint lacks, ValueError for a
    shape mismatch (naming the key and both shapes). Keys the module does not use are returned (and
    printed once) unless they start with one of `ignore_prefixes` (e.g. task heads we know we drop).
    Non-persistent buffers are not expected in the checkpoint.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    if missing:
        raise KeyError(f"{source}: missing tensor(s) {missing[:10]}{' ...' if len(missing) > 10 else ''} "
                       f"({len(missing)} in all)")
    for k, v in own.items():
        if tuple(state_dict[k].shape) != tuple(v.shape):
            raise ValueError(f"{source}: tensor {k!r} has shape {tuple(state_dict[k].shape)} in the checkpoint "
                             f"but {tuple(v.shape)} in the model")
    unused = sorted(k for k in state_dict if k not in own and not k.startswith(tuple(ignore_prefixes)))
    if unused:
        print(f"{source}: {len(unused)} unused tensor(s) not loaded: {unused[:8]}{' ...' if len(unused) > 8 else ''}")
    module.load_state_dict({k: state_dict[k] for k in own}, strict=True)
    return unused


def _torch_load(bin_path):
    try:
        sd = torch.load(bin_path, map_location="cpu", weights_only=True)  # the project's only torch.load
    except Exception as e:
        raise ValueError(f"{bin_path}: not loadable as tensors with weights_only=True ({e})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        nested = f"; top-level keys {list(sd)[:5]} (a training checkpoint?)" if isinstance(sd, dict) else ""
        raise ValueError(f"{bin_path}: expected a flat dict of tensors, got a {type(sd).__name__}{nested}")
    return sd


def convert_bin_to_safetensors(bin_path, out_dir):
    """Turn a legacy `pytorch_model.bin` (or all the shards a `pytorch_model.bin.index.json` names) into
    `out_dir/model.safetensors`, copying config.json if it lies beside it."""
    sd = _load_shards(bin_path, _torch_load) if bin_path.endswith(".index.json") else _torch_load(bin_path)
    os.makedirs(out_dir, exist_ok=True)
    # safetensors refuses shared storage: store contiguous copies.
    save_file({k: v.contiguous().clone() for k, v in sd.items()}, os.path.join(out_dir, "model.safetensors"))
    src_cfg = os.path.join(os.path.dirname(os.path.abspath(bin_path)), "config.json")
    dst_cfg = os.path.join(out_dir, "config.json")
    if os.path.isfile(src_cfg) and os.path.abspath(src_cfg) != os.path.abspath(dst_cfg):
        with open(src_cfg) as f, open(dst_cfg, "w") as g:
            g.write(f.read())
    return os.path.join(out_dir, "model.safetensors")


def write_hf_folder(path, config, state_dict):
    """Write `path/config.json` (the dict `config`, as JSON) and `path/model.safetensors` (`state_dict`: detached,
    contiguous CPU copies, so views and shared storage are stored as plain tensors; metadata {"format": "pt"}, as
    Hugging Face's save_pretrained writes). Creates `path`; returns it."""
    bad = sorted(k for k, v in state_dict.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise ValueError(f"{path}: state dict entries {bad[:5]} are not tensors")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state_dict.items()}
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return path


def check_names_invert(own, converted, path):
    """A writer's guard: its public key names, converted back by the loader's converter (`converted`), must be
    exactly the module's own state dict keys (`own`); a submodule without a public name is an error naming it."""
    lost, extra = sorted(set(own) - set(converted)), sorted(set(converted) - set(own))
    if lost or extra:
        raise ValueError(f"{path}: the public names do not convert back: lost {lost[:5]}, unexpected {extra[:5]}")
