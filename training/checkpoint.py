"""Checkpoints: tensors in safetensors, the rest in JSON, written atomically and verified before a resume;
nothing goes through pickle.

A checkpoint is a folder `ckpt_XXXXXXX/` of a run folder: model.safetensors (the unwrapped ICode),
optimizer.safetensors (AdamW's state by parameter name), rng_rank*.safetensors and loader_rank*.json (each
rank's random generators and data position), state.json (config, arguments, step, world size, loss history),
and files.json, written last: every other file's size and SHA-256, computed from the bytes as they are written.
`--resume` takes the newest checkpoint that verifies (`latest_intact`): a damaged one is renamed
`ckpt_XXXXXXX.damaged` with one line saying which file is wrong and how.
"""
import hashlib
import json
import os
import random
import shutil
from dataclasses import asdict, replace

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load, save
from safetensors.torch import load_model as load_safetensors_into

from icode import ICodeConfig

HASH_CHUNK = 1 << 24            # bytes read at a time when verifying


class CheckpointError(RuntimeError):
    """No checkpoint of a run can be resumed from: the message says why, one line."""


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


def model_tensors(model):
    """The unwrapped model's state dict as safetensors stores it: tensors that share storage (a tied decoder)
    once, under the first of their names that covers the storage, the others named in the metadata (the rule
    of safetensors' own save_model, so that its load_model reads the file). Returns (tensors, metadata)."""
    sd, groups = unwrap(model).state_dict(), {}
    for name, t in sd.items():
        st = t.untyped_storage()
        groups.setdefault((t.device, st.data_ptr(), st.nbytes()), []).append(name)
    tensors, metadata = {}, {}
    for names in groups.values():
        whole = sorted(n for n in names if sd[n].data_ptr() == sd[n].untyped_storage().data_ptr()
                       and sd[n].numel() * sd[n].element_size() == sd[n].untyped_storage().nbytes())
        keep = whole[:1] if len(names) > 1 and whole else names
        for n in names:
            if n in keep:
                tensors[n] = sd[n].detach().cpu().contiguous()
            else:
                metadata[n] = keep[0]
    return tensors, metadata or None


def write_file(path, data):
    """Write bytes (or a str) to `path`; return (size, SHA-256 hex) of what was written, from the bytes in hand."""
    data = data.encode() if isinstance(data, str) else data
    with open(path, "wb") as f:
        f.write(data)
    return [len(data), hashlib.sha256(data).hexdigest()]


def save_weights(model, out_dir):
    """model.safetensors of the unwrapped ICode (tied tensors once), written atomically."""
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, ".model.safetensors.tmp")
    write_file(tmp, save(*model_tensors(model)))
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
    """Finished checkpoint folders, oldest first (a `.tmp` folder is an interrupted write, a `.damaged` one a
    checkpoint that did not verify: both ignored)."""
    if not os.path.isdir(out_dir):
        return []
    return sorted(os.path.join(out_dir, f) for f in os.listdir(out_dir)
                  if f.startswith("ckpt_") and f[5:].isdigit() and os.path.isdir(os.path.join(out_dir, f)))


def resolve_ckpt(path):
    """A checkpoint folder (has state.json), or a run folder -> its latest ckpt_*; 'none' -> None."""
    if path is None or str(path).lower() == "none":
        return None
    if os.path.isfile(os.path.join(path, "state.json")):
        return path
    found = checkpoints(path)
    if not found:
        raise FileNotFoundError(f"{path!r} is neither a checkpoint folder (state.json) nor a run folder with ckpt_*")
    return found[-1]


def rng_file(d):
    """This process's random generators (torch CPU and CUDA, numpy, Python's) as safetensors bytes."""
    cpu, cuda = rng_state(d.device)
    rng = {"torch_cpu": cpu, **({"torch_cuda": cuda} if cuda is not None else {}),
           "numpy": torch.from_numpy(np.asarray(np.random.get_state()[1], dtype=np.int64))}
    return save(rng, metadata={"numpy_pos": str(np.random.get_state()[2]), "python": json.dumps(random.getstate())})


def save_checkpoint(out_dir, step, model, opt, loader, args, d, keep=3, history=None):
    """Every rank writes its RNG state and its loader's state (position and its own bad-row counters), rank 0
    the rest and, last, files.json with every file's size and checksum, into ckpt_XXXXXXX.tmp; then rank 0
    renames it (a reader sees the old set or the new one)."""
    final = os.path.join(out_dir, f"ckpt_{step:07d}")
    tmp = final + ".tmp"
    if d.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    if dist.is_initialized():
        dist.barrier()
    files = {f"rng_rank{d.rank}.safetensors": write_file(os.path.join(tmp, f"rng_rank{d.rank}.safetensors"),
                                                         rng_file(d))}
    if loader is not None:
        files[f"loader_rank{d.rank}.json"] = write_file(os.path.join(tmp, f"loader_rank{d.rank}.json"),
                                                        json.dumps(loader.state_dict()))
    if dist.is_initialized():
        every = [None] * d.world
        dist.all_gather_object(every, files)
        files = {k: v for f in every for k, v in f.items()}
    if d.is_main:
        files["model.safetensors"] = write_file(os.path.join(tmp, "model.safetensors"), save(*model_tensors(model)))
        files["optimizer.safetensors"] = write_file(os.path.join(tmp, "optimizer.safetensors"),
                                                    save(optimizer_tensors(opt, unwrap(model))))
        state = {"step": step, "config": asdict(unwrap(model).cfg), "args": vars(args), "world": d.world,
                 "history": history or []}
        files["state.json"] = write_file(os.path.join(tmp, "state.json"), json.dumps(state))
        write_file(os.path.join(tmp, "files.json"), json.dumps({"files": files}, indent=1, sort_keys=True))
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


def _digest(path):
    """(size, SHA-256 hex) of a file, read once in chunks."""
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
            n += len(chunk)
    return [n, h.hexdigest()]


def _safetensors_whole(path):
    """Why a safetensors file is cut short or unreadable (its header names where the data ends), or None."""
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        header = f.read(n) if 0 < n < 1 << 30 else b""
    try:
        meta = json.loads(header)
    except (ValueError, UnicodeDecodeError):
        return "its header is not readable"
    end = max((v["data_offsets"][1] for k, v in meta.items() if k != "__metadata__"), default=0)
    size = os.path.getsize(path)
    return None if size == 8 + n + end else f"{size} bytes where its header needs {8 + n + end}"


def verify_checkpoint(ckpt):
    """None if the checkpoint is whole, else why not, in a few words naming the file. With files.json: every
    file it lists is there with its size and SHA-256 (one read of each). Without (a checkpoint written before
    files.json existed): state.json and the loaders' JSON parse and every safetensors file is as long as its
    header says."""
    listing = os.path.join(ckpt, "files.json")
    if os.path.isfile(listing):
        try:
            with open(listing) as f:
                files = json.load(f)["files"]
        except (ValueError, KeyError, TypeError) as e:
            return f"files.json is not readable ({e})"
        for name, (size, sha) in sorted(files.items()):
            path = os.path.join(ckpt, name)
            if not os.path.isfile(path):
                return f"{name} is missing"
            got = os.path.getsize(path)
            if got != size:
                return f"{name} has {got} bytes, files.json says {size}"
            if _digest(path)[1] != sha:
                return f"{name} does not match its checksum in files.json"
        return None
    names = sorted(os.listdir(ckpt))
    for name in ("state.json", "model.safetensors", "optimizer.safetensors"):
        if name not in names:
            return f"{name} is missing"
    for name in names:
        path = os.path.join(ckpt, name)
        if name.endswith(".json"):
            try:
                with open(path) as f:
                    json.load(f)
            except ValueError as e:
                return f"{name} is not valid JSON ({e})"
        elif name.endswith(".safetensors"):
            why = _safetensors_whole(path)
            if why:
                return f"{name}: {why}"
    return None


def latest_intact(out_dir, d, log=print):
    """The newest checkpoint of `out_dir` that verifies, the same on every rank (rank 0 decides), or None when
    there is none. Newer ones that do not verify are renamed ckpt_XXXXXXX.damaged (never picked again), with
    one line each; when every checkpoint is damaged, CheckpointError (one line) on every rank."""
    found = checkpoints(out_dir)
    choice = [None, None]                      # (the checkpoint, the error) as rank 0 decides
    if d.is_main:
        damaged = []
        for ckpt in reversed(found):
            why = verify_checkpoint(ckpt)
            if why is None:
                choice[0] = ckpt
                break
            moved = ckpt + ".damaged"
            k = 1
            while os.path.exists(moved):
                moved, k = f"{ckpt}.damaged{k}", k + 1
            os.replace(ckpt, moved)
            damaged.append(f"{os.path.basename(ckpt)}: {why}")
            log(f"checkpoint {ckpt}: {why}; moved to {os.path.basename(moved)}, trying the one before")
        if found and choice[0] is None:
            choice[1] = f"no intact checkpoint in {out_dir}: " + "; ".join(damaged)
    if dist.is_initialized():
        dist.broadcast_object_list(choice, src=0)
    if choice[1]:
        raise CheckpointError(choice[1])
    return choice[0]


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


def restore_checkpoint(ckpt, model, opt, loader, d, global_batch=None, seed=0, log=print):
    """Load weights, optimiser, loader position, this rank's RNG state and normalize_audio (the one setting no
    flag sets) into the model's config. Returns (step, history).

    On as many processes as wrote it: everything as it was, so the run continues bit for bit. On another number
    (the loader's state is the same on every rank): the data order is a function of the step and the global
    batch (pipeline/sampler.py), so with the same global batch every step takes the same rows with the same
    masks; the bad-row counts of every old rank go to rank 0; the random generators (dropout) start afresh from
    (seed, rank, step). With another global batch every source goes on from its place in its epoch. Says once
    which of these holds."""
    state = read_state(ckpt)
    check_same_model(ckpt, state, model)
    load_safetensors_into(unwrap(model), os.path.join(ckpt, "model.safetensors"))
    with open(os.path.join(ckpt, "optimizer.safetensors"), "rb") as f:
        load_optimizer_tensors(opt, unwrap(model), load(f.read()))
    old_world, step = state["world"], state["step"]
    if loader is not None:
        loaders = loader_states(ckpt, state, d if old_world == d.world else None)
        mine = loaders[0] if old_world != d.world else loaders[d.rank]
        if old_world != d.world:       # every old rank's bad-row counts on rank 0, none on the others
            mine = dict(mine, bad=_sum([s.get("bad", {}) for s in loaders]) if d.is_main else {},
                        tried=_sum([s.get("tried", {}) for s in loaders]) if d.is_main else {},
                        reasons={} if not d.is_main else mine.get("reasons", {}))
        old_batch = mine["sampler"].get("global_batch")
        loader.load_state_dict(mine)
        if d.is_main and (old_world != d.world or None not in (old_batch, global_batch) and old_batch != global_batch):
            log(resume_guarantee(ckpt, old_world, d.world, old_batch, global_batch))
    if old_world == d.world:
        restore_rng(os.path.join(ckpt, f"rng_rank{d.rank}.safetensors"), d)
    else:
        s = int(np.random.SeedSequence([seed, d.rank, step]).generate_state(1)[0])
        torch.manual_seed(s)
        np.random.seed(s)
        random.seed(s)
    return step, state.get("history", [])


def resume_guarantee(ckpt, old_world, world, old_batch, batch):
    """One line: what changed since the checkpoint and what still holds."""
    procs = lambda n: f"{n} process{'es' if n != 1 else ''}"  # noqa: E731
    what = f"resuming {os.path.basename(ckpt)} on {procs(world)} (written by {procs(old_world)})"
    if old_batch in (None, batch):
        return (f"{what}, global batch {batch} kept: every step takes the rows and masks the uninterrupted run "
                f"would have; the losses agree to float precision (summation order; dropout draws start afresh)")
    return (f"{what}, global batch {old_batch} -> {batch}: every source goes on from its place in its current "
            f"epoch (no row of it seen twice, none skipped), the rows of each step differ from an uninterrupted "
            f"run's")


def loader_states(ckpt, state, d=None):
    """The loaders' states of a checkpoint: [rank 0's, rank 1's, ...], or with `d` only this rank's in its
    place (the others None). The one of a single process may sit in state.json (older layout)."""
    out = []
    for r in range(state["world"]):
        if d is not None and r != d.rank:
            out.append(None)
            continue
        path = os.path.join(ckpt, f"loader_rank{r}.json")
        if os.path.isfile(path):
            with open(path) as f:
                out.append(json.load(f))
        elif state.get("loader") is not None and state["world"] == 1:
            out.append(state["loader"])
        else:
            raise FileNotFoundError(f"{path} is missing: --resume continues rank {r}'s data order from it")
    return out


def _sum(counts):
    out = {}
    for c in counts:
        for k, v in c.items():
            out[k] = out.get(k, 0) + v
    return out


def restore_rng(path, d):
    """This rank's random generators as a checkpoint saved them (`rng_file`)."""
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        rng = {k: f.get_tensor(k) for k in f.keys()}
    set_rng_state((rng["torch_cpu"], rng.get("torch_cuda")), d.device)
    np.random.set_state(("MT19937", rng["numpy"].numpy().astype(np.uint32), int(meta["numpy_pos"])))
    py = json.loads(meta["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))


def check_same_model(ckpt, state, model):
    """Refuse a checkpoint of other model settings, naming them; normalize_audio (no flag sets it) is taken
    from the checkpoint into the model's config."""
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
