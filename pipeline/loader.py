"""The pretraining loader: each step's plan (pipeline/sampler.py) decoded in DataLoader workers, bad rows skipped
with spares and counted per source, the batch built by the function the caller gives (data.collate), the
position resumable exactly. `data.make_loader` builds one.
"""
import collections
import functools
import math
import os
import signal
import sys
import threading

import numpy as np
import torch

from pipeline.media import BadExample, reason_kind
from pipeline.sampler import MixedBatchSampler


class TooManyBadExamples(RuntimeError):
    """More than `DataConfig.max_bad_share` of a source's rows were bad: fix the data, don't train on it."""


class _BatchMaker:
    """What a DataLoader worker runs per plan: decode rows until the batch is full, skip bad ones, then
    make_batch(examples, generator=[one generator per example]) (data.collate)."""

    def __init__(self, datasets, make_batch, batch_size, seed, rank):
        self.datasets, self.make_batch = datasets, make_batch
        self.batch_size, self.seed, self.rank = batch_size, seed, rank

    def __getitem__(self, plan):
        step, s, rows, spares, state = plan
        ds = self.datasets[s]
        good, used, skipped, stale, tried = [], [], [], [], 0
        for i in rows + spares:
            if len(good) == self.batch_size:
                break
            tried += 1
            try:
                ex = ds[i]
            except BadExample as e:
                skipped.append((ds.name, ds.line(i), e.reason))
                continue
            good.append(ex)
            used.append(i)
            if ex.get("stale_targets"):
                stale.append(ds.line(i))
        batch = self.make_batch(good, generator=[self.generator(step, s, i) for i in used]) if good else None
        if batch is not None:
            batch["step"] = step
        return {"batch": batch, "step": step, "source": s, "skipped": skipped, "tried": tried, "state": state,
                "stale": stale}

    def generator(self, step, source, row):
        """The generator of one example's masks: seeded by (seed, step, source, row) alone, so an example gets the
        same masks at a step whichever rank reads it, whatever the number of ranks."""
        seed = np.random.SeedSequence([self.seed, step, source, row]).generate_state(1)[0]
        return torch.Generator().manual_seed(int(seed))


def _identity(x):
    return x


def _worker_init(_, trainer=None):
    """DataLoader worker set-up: one torch thread, and the job's stop signals left to the trainer (pid
    `trainer`), which finishes its step and saves a checkpoint while its workers still serve. torchrun,
    `kill -- -PGID` and Ctrl-C signal the trainer's process group: the worker leaves it. Slurm sends SIGTERM
    to every process: the worker ignores a SIGTERM from anyone but the trainer, whose SIGTERM (how it stops
    its workers at exit) still ends the worker at once. Without sigwaitinfo (macOS) only the first part."""
    torch.set_num_threads(1)
    if hasattr(os, "setpgid"):
        os.setpgid(0, 0)
    if trainer is not None and hasattr(signal, "sigwaitinfo"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # this thread and those it starts

        def wait_for_the_trainer():  # in a thread with SIGTERM blocked: it receives the signal with its sender
            while signal.sigwaitinfo({signal.SIGTERM}).si_pid != trainer:
                pass
            os._exit(0)
        threading.Thread(target=wait_for_the_trainer, daemon=True).start()


class MixedLoader:
    """Iterable of batches mixed from several manifests (`data.make_loader` builds one).

    datasets: ManifestDatasets; weights: their mixing weights; make_batch(examples, generator=g) -> a batch
    (data.collate with the run's DataConfig and tokenizer); batch_size: examples per rank and step.

    .state_dict() / .load_state_dict(d): the position after the last batch handed out (plus the bad-row
    counters); a new iterator continues with the exact next batch. .bad_counts {source: rows skipped},
    .tried_counts {source: rows tried}, .bad_reasons {source: Counter of reasons}, all of this rank's rows
    (each rank reads its own); .bad_report() sums them up. Iterates forever, or until more than
    `max_bad_share` of a source's rows tried since the loader was made or restored (at least `min_tried` of
    them, or the whole source) are bad: TooManyBadExamples, with the counters as after the last batch.
    """

    def __init__(self, datasets, weights, make_batch, batch_size, rank=0, world_size=1, seed=0, num_workers=0,
                 max_bad_share=0.1, spares=None, report_first=5, min_tried=50, log=None):
        self.datasets, self.max_bad_share = datasets, max_bad_share
        spares = max(2, math.ceil(2 * max_bad_share * batch_size)) if spares is None else spares
        self.sampler = MixedBatchSampler([len(d) for d in datasets], weights, batch_size, rank, world_size, seed,
                                         spares, names=[d.name for d in datasets])
        self.maker = _BatchMaker(datasets, make_batch, batch_size, seed, rank)
        self.num_workers, self.report_first, self.min_tried = num_workers, report_first, min_tried
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.bad_counts = {d.name: 0 for d in datasets}
        self.tried_counts = {d.name: 0 for d in datasets}
        self.bad_reasons = {d.name: collections.Counter() for d in datasets}
        self.since_start = {d.name: (0, 0) for d in datasets}  # (bad, tried) since made or restored: the stop rule
        self.stale_reported = set()          # sources whose stale target cache has been reported
        self._state = self.sampler.state_dict()

    def _plans(self):
        self.sampler.load_state_dict(self._state)
        for step, s, rows, spares in self.sampler:
            yield step, s, rows, spares, self.sampler.state_dict()

    def __iter__(self):
        if self.num_workers > 0:
            it = torch.utils.data.DataLoader(self.maker, batch_size=None, sampler=self._plans(), collate_fn=_identity,
                                             num_workers=self.num_workers,
                                             worker_init_fn=functools.partial(_worker_init, trainer=os.getpid()),
                                             prefetch_factor=2, persistent_workers=False,
                                             # its own generator: drawing the workers' base seed from the
                                             # global one would shift every later draw (dropout) of a
                                             # resumed run against an uninterrupted one
                                             generator=torch.Generator().manual_seed(self.sampler.seed))
        else:
            it = (self.maker[p] for p in self._plans())
        for out in it:
            self._account(out)
            self._state = out["state"]
            if out["batch"] is not None:
                yield out["batch"]
            else:  # every plan yields, an all-bad one an empty batch, so that all ranks stay on the same
                ds = self.datasets[out["source"]]  # step (train.common_batch then skips it on every rank)
                yield {"empty": True, "index": [], "source": ds.name, "modalities": ds.modalities, "step": out["step"]}

    def _account(self, out):
        ds = self.datasets[out["source"]]
        name = ds.name
        if out["stale"] and name not in self.stale_reported:
            self.stale_reported.add(name)
            self.log(f"data: {ds.path}:{out['stale'][0]}: the target cache {ds.targets.folder} was written for another "
                     f"row on this line (manifest edited?); such rows get their targets on the device; "
                     f"re-run `python -m pipeline tokenize`")
        reported = sum(self.bad_counts.values())
        for i, (_, line, reason) in enumerate(out["skipped"]):
            if reported + i < self.report_first:
                self.log(f"data: skipped {ds.path}:{line}: {reason}")
        reasons = self.bad_reasons[name] + collections.Counter(reason_kind(r) for _, _, r in out["skipped"])
        # The share is judged on the rows this loader tried since it was made or restored (a run resumed on
        # repaired rows judges them as they are now); the whole run's counts go on in the state and the report.
        bad, tried = (a + b for a, b in zip(self.since_start[name], (len(out["skipped"]), out["tried"])))
        if tried >= min(self.min_tried, len(ds)) and bad > self.max_bad_share * tried:
            # All counters stay as after the last batch handed out, those of a checkpoint saved at this stop.
            raise TooManyBadExamples(
                f"{ds.path}: {bad} of the {tried} rows tried since this run started or resumed were bad "
                f"({bad / tried:.0%} > max_bad_share {self.max_bad_share:.0%}); reasons "
                f"{dict(reasons.most_common(5))}. "
                f"Run `python -m pipeline check {ds.path}` for the full list.")
        self.since_start[name] = (bad, tried)
        self.bad_counts[name] += len(out["skipped"])
        self.tried_counts[name] += out["tried"]
        self.bad_reasons[name] = reasons

    def bad_report(self):
        """One line per source with bad rows: how many of the rows tried, and the reasons ("" if none)."""
        return "\n".join(f"data: {ds.path}: {self.bad_counts[ds.name]} of {self.tried_counts[ds.name]} rows tried "
                         f"were bad and skipped; reasons {dict(self.bad_reasons[ds.name].most_common(5))}"
                         for ds in self.datasets if self.bad_counts[ds.name])

    def state_dict(self):
        return {"sampler": dict(self._state), "bad": dict(self.bad_counts), "tried": dict(self.tried_counts),
                "reasons": {k: dict(v) for k, v in self.bad_reasons.items()}}

    def load_state_dict(self, d):
        self._state = dict(d["sampler"])
        self.sampler.load_state_dict(self._state)
        self.bad_counts.update(d.get("bad", {}))
        self.tried_counts.update(d.get("tried", {}))
        for name, reasons in d.get("reasons", {}).items():
            if name in self.bad_reasons:
                self.bad_reasons[name] = collections.Counter(reasons)
        self.since_start = {name: (0, 0) for name in self.since_start}
