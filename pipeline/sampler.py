"""Which rows each rank trains on at each step: one source per global step, drawn by the mixing weights, its
rows sharded across ranks, resumable exactly (section 3's video clips and dual-modality pairs mixed in one run).
"""
import numpy as np


class MixedBatchSampler:
    """Plans each rank's batches: which source, which rows, and a few spare rows in case some are bad.

    Step k draws its source from `weights` with a generator seeded by (seed, k) alone, so every rank picks
    the same source at the same step (same modalities, same DDP graph). Each source is shuffled once per
    epoch with a generator seeded by (seed, source, epoch); rank r owns positions r, r + W, r + 2W, ... of
    that permutation (n // W of them, so ranks never overlap and all have the same count) and walks its
    share `batch_size` rows per step; a batch never spans two epochs (the tail of an epoch that does not
    fill one is dropped, like drop_last). Every rank advances the same per-source counter, so epochs turn
    over together. Spares are distinct rows of the rank's own share of the current epoch outside the batch
    (so a replaced bad row never duplicates an example of the batch), drawn with a generator seeded by (seed, k, rank).
    The state is {"step": k, "consumed": {source name: rows consumed per rank}}: JSON-able and exact.
    """

    def __init__(self, sizes, weights, batch_size, rank=0, world_size=1, seed=0, spares=2, names=None):
        if len(sizes) != len(weights) or not sizes:
            raise ValueError(f"need one weight per source, got {len(sizes)} sources and {len(weights)} weights")
        w = np.asarray(weights, dtype=np.float64)
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights must be non-negative and not all zero, got {list(weights)}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.names = list(names) if names is not None else [str(i) for i in range(len(sizes))]
        for n, name, wi in zip(sizes, self.names, w):
            if wi > 0 and n // world_size < batch_size:
                raise ValueError(f"source {name} has {n} rows, fewer than batch_size x world_size "
                                 f"({batch_size} x {world_size})")
        self.sizes, self.p = list(sizes), w / w.sum()
        self.batch_size, self.rank, self.world_size, self.seed, self.spares = batch_size, rank, world_size, seed, spares
        self.step = 0
        self.consumed = {name: 0 for name in self.names}
        self._perm = {}

    def source_at(self, step):
        """The source index of global step `step`: a function of (seed, step) only."""
        return int(np.random.default_rng([self.seed, step]).choice(len(self.p), p=self.p))

    def _row(self, s, j):
        """Row index of the j-th row (counting over epochs) of this rank's share of source s."""
        per_rank = self.sizes[s] // self.world_size
        epoch, k = divmod(j, per_rank)
        if self._perm.get(s, (None,))[0] != epoch:
            self._perm[s] = (epoch, np.random.default_rng([self.seed, s, epoch]).permutation(self.sizes[s]))
        return int(self._perm[s][1][self.rank + k * self.world_size])

    def next_plan(self):
        """-> (step, source index, rows, spare rows); advances the state."""
        step, s = self.step, self.source_at(self.step)
        per_rank = self.sizes[s] // self.world_size
        pos = self.consumed[self.names[s]]
        if pos % per_rank + self.batch_size > per_rank:  # a batch never spans two epochs (drop the tail)
            pos = (pos // per_rank + 1) * per_rank
        rows = [self._row(s, j) for j in range(pos, pos + self.batch_size)]
        rng = np.random.default_rng([self.seed, step, self.rank, 1])
        epoch_start, k0 = pos // per_rank * per_rank, pos % per_rank
        n_out = per_rank - self.batch_size  # the share's positions outside this batch, [k0, k0 + batch) skipped
        picks = rng.choice(n_out, min(self.spares, n_out), replace=False) if n_out > 0 else []
        spares = [self._row(s, epoch_start + (int(k) if k < k0 else int(k) + self.batch_size)) for k in picks]
        self.consumed[self.names[s]] = pos + self.batch_size
        self.step += 1
        return step, s, rows, spares

    def __iter__(self):
        while True:
            yield self.next_plan()

    def state_dict(self):
        return {"step": self.step, "consumed": dict(self.consumed), "seed": self.seed, "world_size": self.world_size}

    def load_state_dict(self, d):
        if d.get("seed", self.seed) != self.seed or d.get("world_size", self.world_size) != self.world_size:
            raise ValueError(f"sampler state for seed {d.get('seed')} / world size {d.get('world_size')} "
                             f"cannot resume seed {self.seed} / world size {self.world_size}")
        self.step = int(d["step"])
        self.consumed = {name: int(d["consumed"].get(name, 0)) for name in self.names}
