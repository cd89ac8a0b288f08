"""The rows of the toy report's Tables 1-2 (section 5.1): which data pretrains the fusion, and with which fusion.

The paper's rows cross the fusion's pretraining data, the dual-modality datasets "D", the videos "V" or both,
with the fusion mode, merge "M" or co-attention "C", against "No Pretrain" (the single-modality encoders under a
fresh fusion network). `python train.py` makes the D+V+M row; `pretrain_rows` makes the others with that run's
recipe, so that the rows differ only in what the paper varies.
"""
import json
import os
import subprocess
import sys
import time

from pipeline.toy import TOY_DUAL, TOY_PRETRAIN, TOY_VIDEOS
from training.checkpoint import checkpoints, read_state, resolve_ckpt

ROWS = {  # Tables 1-2's rows (section 5.1): (the fusion's pretraining sources, fusion mode); None: no pretraining
    "NP+M": (None, "merge"), "D+M": (TOY_DUAL, "merge"), "D+C": (TOY_DUAL, "co"), "V+M": (TOY_VIDEOS, "merge"),
    "D+V+M": (TOY_PRETRAIN, "merge")}
MAIN_ROW = "D+V+M"     # `python train.py`'s run
SUBSET_ROW = "D+M"     # Table 8's model, as in the paper (its V+L+S row is Table 2's D+M)
SUBSET_TASKS = ("sentiment", "emotion", "binary")   # the toy tasks whose labels need all three modalities
SUBSETS = [("video",), ("text",), ("audio",), ("video", "text"), ("video", "audio"), ("text", "audio"),
           ("video", "text", "audio")]                                        # Table 8's seven rows
RECIPE = ("steps", "batch", "lr_fusion", "lr_encoders", "lr_temperature", "warmup", "decay", "weight_decay", "clip",
          "alpha", "beta", "gamma", "lam", "loss_weights", "contrastive_inputs", "seed", "workers", "text_encoder",
          "vision_encoder", "speech_encoder")   # what a row's pretraining copies from the main run
TRAIN_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py")


def row_run(row, runs_dir="runs"):
    """The run folder of a Tables 1-2 row that eval.py pretrains (D+M -> runs/toy_D_M)."""
    return os.path.join(runs_dir, "toy_" + row.replace("+", "_"))


def row_argv(row, main_ckpt, toy_dir, out):
    """train.py's arguments for a row: the main run's recipe (the RECIPE arguments of its state.json: steps,
    batch, learning rates, the same stage-one encoder folders) on the row's own sources and fusion mode."""
    sources, fusion = ROWS[row]
    recorded = read_state(main_ckpt)["args"]
    argv = ["--data", *[os.path.join(toy_dir, f) for f in sources], "--tokenizer",
            os.path.join(toy_dir, "tokenizer.json"), "--fusion", fusion, "--out", out, "--no-eval",
            "--save-every", str(recorded["steps"]), "--keep", "1"]
    for k in RECIPE:
        if recorded.get(k) is not None:
            argv += ["--" + k.replace("_", "-"), str(recorded[k])]
    return argv


def pretrain_rows(main_ckpt, toy_dir, runs_dir, device):
    """{row: checkpoint} for every row of ROWS (None for NP+M; `python train.py`'s run for D+V+M), pretraining
    the rows that have no run yet as `python train.py` processes (each writes <run>.log; one progress bar follows
    their metrics.jsonl). On a GPU they run one after the other; on a CPU all at once, sharing the cores, which
    gets through more steps per second than one process using every core (README, Results). A row run with
    another recipe than the main run's is refused."""
    from tqdm import tqdm
    todo = [r for r in ROWS if ROWS[r][0] is not None and r != MAIN_ROW and not checkpoints(row_run(r, runs_dir))]
    main = read_state(main_ckpt)["args"]
    steps = main["steps"]
    at_once = 1 if device.type == "cuda" else max(1, len(todo))
    threads = max(1, (os.cpu_count() or 1) // at_once)
    with tqdm(total=steps * len(todo), desc="pretraining " + ", ".join(todo), dynamic_ncols=True,
              disable=not todo) as bar:
        for i in range(0, len(todo), at_once):
            wave = todo[i:i + at_once]
            procs = {r: _start_row(r, main_ckpt, toy_dir, runs_dir, device, threads) for r in wave}
            while any(p.poll() is None for p, _ in procs.values()):
                time.sleep(2)
                bar.update(max(0, sum(_logged_step(row_run(r, runs_dir)) for r in todo) - bar.n))
            for r, (p, log) in procs.items():
                log.close()
                if p.returncode != 0:
                    with open(row_run(r, runs_dir) + ".log") as f:
                        tail = f.read()[-2000:]
                    raise RuntimeError(f"pretraining {r} failed (exit {p.returncode}); the end of "
                                       f"{row_run(r, runs_dir)}.log:\n{tail}")
    out = {}
    for r, (sources, _) in ROWS.items():
        out[r] = None if sources is None else main_ckpt if r == MAIN_ROW else resolve_ckpt(row_run(r, runs_dir))
        if sources is not None and r != MAIN_ROW:
            theirs = read_state(out[r])["args"]
            differ = {k: (theirs.get(k), main.get(k)) for k in RECIPE
                      if k != "workers" and theirs.get(k) != main.get(k)}
            if differ:
                raise ValueError(f"{out[r]} was pretrained with another recipe than {main_ckpt} (theirs, main: "
                                 f"{differ}); remove {row_run(r, runs_dir)}/ to pretrain {r} again")
    return out


def _start_row(row, main_ckpt, toy_dir, runs_dir, device, threads):
    """Start `python train.py` for a row, its output in <run>.log -> (process, open log file)."""
    out = row_run(row, runs_dir)
    print(f"pretraining i-Code {row} on {', '.join(ROWS[row][0])} ({ROWS[row][1]} fusion) into {out}/", flush=True)
    os.makedirs(runs_dir, exist_ok=True)
    log = open(out + ".log", "w")
    argv = row_argv(row, main_ckpt, toy_dir, out) + ["--device", device.type]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    return subprocess.Popen([sys.executable, TRAIN_PY] + argv, stdout=log, stderr=subprocess.STDOUT, env=env), log


def _logged_step(run):
    """The last step a running train.py wrote to run/metrics.jsonl (0 before the first line)."""
    try:
        with open(os.path.join(run, "metrics.jsonl")) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):     # the last line may be half written
        try:
            return json.loads(line)["step"]
        except (ValueError, KeyError):
            continue
    return 0
