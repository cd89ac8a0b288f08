"""Checkpoints: tensors in safetensors, the rest in JSON, written atomically; nothing goes through pickle.

A checkpoint is a folder `ckpt_XXXXXXX/` of a run folder: model.safetensors (the unwrapped ICode),
optimizer.safetensors (AdamW's state by parameter name), rng_rank*.safetensors and loader_rank*.json (each
rank's random generators and data position), state.json (config, arguments, step, world size, loss history).
"""
import json
import os
import random
import shutil
from dataclasses import asdict, replace

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file, save_model
from safetensors.torch import load_model as load_safetensors_into

from icode import ICodeConfig


def rng_state(device):
    return (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def set_rng_state(state, device):
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def unwrap(m):
    m = getattr(m, "module", m)
    m = getattr(m, "_orig_mod", m)
    return getattr(m, "model", m)


def save_weights(model, out_dir):
    """model.safetensors of the unwrapped ICode (tied tensors de-duplicated), written atomically."""
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, ".model.safetensors.tmp")
    save_model(unwrap(model), tmp)
    os.replace(tmp, os.path.join(out_dir, "model.safetensors"))


def optimizer_tensors(opt, model):
    """AdamW state as {f"{param name}::{key}": tensor} (no pickle)."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for p, st in opt.state.items():
        for k, v in st.items():
            out[f"{names[id(p)]}::{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
    return out


def load_optimizer_tensors(opt, model, tensors):
    names = {id(p): n for n, p in model.named_parameters()}
    sd = opt.state_dict()
    idx = 0
    state = {}
    for g in opt.param_groups:
        for p in g["params"]:
            prefix = names[id(p)] + "::"
            st = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if st:
                state[idx] = st
            idx += 1
    sd["state"] = state
    opt.load_state_dict(sd)


def checkpoints(out_dir):
    """Finished checkpoint folders, oldest first (a `.tmp` folder is an interrupted write: ignored)."""
    if not os.path.isdir(out_dir):
        return []
    return sorted(os.path.join(out_dir, f) for f in os.listdir(out_dir)
                  if f.startswith("ckpt_") and not f.endswith(".tmp")
                  and os.path.isfile(os.path.join(out_dir, f, "state.json")))


def save_checkpoint(out_dir, step, model, opt, loader, args, d, keep=3, history=None):
    """Every rank writes its RNG state and its loader's state (position and its own bad-row counters), rank 0
    the rest, into ckpt_XXXXXXX.tmp, then rank 0 renames it."""
    final = os.path.join(out_dir, f"ckpt_{step:07d}")
    tmp = final + ".tmp"
    if d.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    if dist.is_initialized():
        dist.barrier()
    cpu, cuda = rng_state(d.device)
    rng = {"torch_cpu": cpu}
    if cuda is not None:
        rng["torch_cuda"] = cuda
    rng["numpy"] = torch.from_numpy(np.asarray(np.random.get_state()[1], dtype=np.int64))
    save_file(rng, os.path.join(tmp, f"rng_rank{d.rank}.safetensors"),
              metadata={"numpy_pos": str(np.random.get_state()[2]), "python": json.dumps(random.getstate())})
    if loader is not None:
        with open(os.path.join(tmp, f"loader_rank{d.rank}.json"), "w") as f:
            json.dump(loader.state_dict(), f)
    if d.is_main:
        save_model(unwrap(model), os.path.join(tmp, "model.safetensors"))
        save_file(optimizer_tensors(opt, unwrap(model)), os.path.join(tmp, "optimizer.safetensors"))
        state = {"step": step, "config": asdict(unwrap(model).cfg), "args": vars(args), "world": d.world,
                 "history": history or []}
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump(state, f)
    if dist.is_initialized():
        dist.barrier()
    if d.is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)                     # atomic: a reader sees the old set or the new one
        for old in checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return final


def config_differences(a, b, prefix=""):
    """Where two configs (JSON dicts) differ: ["fusion.mode: 'merge' (checkpoint) != 'co' (this run)", ...]."""
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += config_differences(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix}{k}: {x!r} (checkpoint) != {y!r} (this run)")
    return out


def restore_checkpoint(ckpt, model, opt, loader, d):
    """Load weights, optimiser, loader position, this rank's RNG state and normalize_audio (the one setting no
    flag sets) into the model's config. Returns (step, history)."""
    state = read_state(ckpt)
    if state["world"] != d.world:
        raise ValueError(f"{ckpt} was written by {state['world']} processes, this run has {d.world}: "
                         "the data order and RNG streams would not continue exactly")
    # through from_dict: fields added since the checkpoint was written take what it was trained with
    saved = ICodeConfig.from_dict(state["config"])
    # no flag sets normalize_audio: the run goes on with the input it was trained on (raw audio for a checkpoint
    # older than the field, icode.FIELDS_ADDED_LATER); every other setting must be this run's
    unwrap(model).cfg = replace(unwrap(model).cfg, normalize_audio=saved.normalize_audio)
    saved, own = (json.loads(json.dumps(asdict(c))) for c in (saved, unwrap(model).cfg))
    if saved != own:
        diff = "; ".join(config_differences(saved, own)[:5])
        raise ValueError(f"{ckpt} holds a model of other settings ({diff}): --resume with the flags the run started "
                         f"with (--preset, --fusion, the encoders, --video-tokenizer / --speech-tokenizer)")
    load_safetensors_into(unwrap(model), os.path.join(ckpt, "model.safetensors"))
    load_optimizer_tensors(opt, unwrap(model), load_file(os.path.join(ckpt, "optimizer.safetensors")))
    if loader is not None:
        path = os.path.join(ckpt, f"loader_rank{d.rank}.json")
        if os.path.isfile(path):
            with open(path) as f:
                loader.load_state_dict(json.load(f))
        elif state.get("loader") is not None and d.world == 1:   # written before the per-rank files
            loader.load_state_dict(state["loader"])
        else:
            raise FileNotFoundError(f"{path} is missing: --resume continues rank {d.rank}'s data order from it")
    path = os.path.join(ckpt, f"rng_rank{d.rank}.safetensors")
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        rng = {k: f.get_tensor(k) for k in f.keys()}
    set_rng_state((rng["torch_cpu"], rng.get("torch_cuda")), d.device)
    np.random.set_state(("MT19937", rng["numpy"].numpy().astype(np.uint32), int(meta["numpy_pos"])))
    py = json.loads(meta["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    return state["step"], state.get("history", [])


def read_state(ckpt):
    """A checkpoint folder's state.json (config, arguments, step, world size, loss history)."""
    path = os.path.join(ckpt, "state.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{ckpt!r} has no state.json (not a train.py checkpoint folder)")
    with open(path) as f:
        return json.load(f)


def check_preset(ckpt, preset_name, fusion=None):
    """A checkpoint's model goes with the data settings (clip shape) and learning rates of the preset it was
    pretrained with: refuse another --preset rather than feed a paper model toy clips, or the reverse; and
    another --fusion (when one is given) than the model's, rather than ignore it. Returns the model's fusion
    mode ("merge" or "co")."""
    state = read_state(ckpt)
    trained, mode = state["args"]["preset"], state["config"]["fusion"]["mode"]
    if trained != preset_name:
        raise ValueError(f"{ckpt} was pretrained with --preset {trained}, this run has --preset {preset_name}: "
                         f"give --preset {trained} (it sets the clip shape and the learning rates)")
    if fusion not in (None, mode):
        raise ValueError(f"{ckpt} was pretrained with {mode} fusion, not --fusion {fusion}")
    return mode
