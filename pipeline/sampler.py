"""Which rows each rank trains on at each step: one source per global step, drawn by the mixing weights, its
rows sharded across ranks, resumable exactly (section 3's video clips and dual-modality pairs mixed in one run).

Each epoch's order of a source is a seeded permutation computed per index (`Permutation`), so the sampler holds
no table: its memory and the time of a plan do not depend on the sources' sizes.
"""
import numpy as np

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x):
    """splitmix64's finaliser (Steele et al. 2014): a bijective avalanche of 64-bit integers. x: uint64 array."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


class Permutation:
    """A seeded bijection of [0, n), computed index by index: a balanced Feistel network on the 2h-bit domain
    [0, 4^h), 4^h >= n, whose round function is splitmix64's finaliser keyed by the seed, restricted to [0, n) by
    cycle walking (Black & Rogaway 2002, "Ciphers with arbitrary finite domains"): apply the network again until
    the value falls in [0, n). The domain is less than 4n, so a walk takes under four applications on average.
    Four rounds make a pseudorandom permutation asymptotically (Luby & Rackoff 1988), but on a domain of a few
    bits, where a round function has few values to choose from, four rounds are measurably non-uniform (where
    index 3 of a 10-element permutation lands: chi-square 69 over 20,000 keys, 9 degrees of freedom); eight
    pass (tests/test_scale.py). perm(i) for an int or an integer array; `key`: ints (seed, source, epoch)."""

    ROUNDS = 8

    def __init__(self, n, key):
        if n < 1:
            raise ValueError(f"a permutation of {n} elements")
        self.n = n
        self.half = max(1, ((n - 1).bit_length() + 1) // 2)               # h: each half of the index, in bits
        self.keys = np.random.SeedSequence(list(key)).generate_state(self.ROUNDS, dtype=np.uint64)

    def _feistel(self, x):
        h = np.uint64(self.half)
        m = np.uint64((1 << self.half) - 1)
        left, right = x >> h, x & m
        for k in self.keys:
            left, right = right, left ^ (_mix(right ^ k) & m)
        return (left << h) | right

    def __call__(self, i):
        x = np.asarray(i, dtype=np.int64)
        if x.size and (x.min() < 0 or x.max() >= self.n):
            raise IndexError(f"index outside [0, {self.n})")
        y = self._feistel(x.astype(np.uint64).reshape(-1))
        out = y >= self.n
        while out.any():                                                      # cycle walking
            y[out] = self._feistel(y[out])
            out = y >= self.n
        y = y.astype(np.int64).reshape(x.shape)
        return int(y) if y.ndim == 0 else y


class MixedBatchSampler:
    """Plans each rank's batches: which source, which rows, and a few spare rows in case some are bad.

    Step k draws its source from `weights` with a generator seeded by (seed, k) alone, so every rank picks the
    same source at the same step (same modalities, same DDP graph). Each source is shuffled once per epoch by
    the permutation keyed by (seed, source, epoch) (`Permutation`). Step k takes the next G rows of its source's
    epoch order, G = batch_size x world_size (the global batch), and rank r of W takes its contiguous share of
    them, positions r * batch_size to (r + 1) * batch_size - 1 of the G: the rows of a step are a function of
    the global batch alone, not of the number of processes (MosaicML Streaming calls this elastic determinism),
    and ranks never overlap. A batch never spans two epochs: the tail of an epoch too short for G rows is
    dropped (like drop_last). Spares are distinct rows of the current epoch outside the step's G rows (so a
    replaced bad row never duplicates an example of the step), drawn with a generator seeded by (seed, k, rank).

    The state is {"step": k, "epoch": {source: epoch}, "pos": {source: rows of that epoch consumed}, "seed"}:
    JSON-able, the same on every rank, and exact. Loaded with another global batch, each source goes on from
    its position in its epoch: no row of the epoch is seen twice and none is skipped (but the dropped tail).
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
            if wi > 0 and n < batch_size * world_size:
                raise ValueError(f"source {name} has {n} rows, fewer than batch_size x world_size "
                                 f"({batch_size} x {world_size})")
        self.sizes, self.p = list(sizes), w / w.sum()
        self.batch_size, self.rank, self.world_size, self.seed, self.spares = batch_size, rank, world_size, seed, spares
        self.global_batch = batch_size * world_size
        self.step = 0
        self.epoch = {name: 0 for name in self.names}
        self.pos = {name: 0 for name in self.names}
        self._perm = {}               # {source: (epoch, Permutation)}: the current epoch's order, a few numbers

    def source_at(self, step):
        """The source index of global step `step`: a function of (seed, step) only."""
        return int(np.random.default_rng([self.seed, step]).choice(len(self.p), p=self.p))

    def _rows(self, s, epoch, positions):
        """Row indices at `positions` (ints) of source s's order in `epoch`."""
        if self._perm.get(s, (None,))[0] != epoch:
            self._perm[s] = (epoch, Permutation(self.sizes[s], (self.seed, s, epoch)))
        return self._perm[s][1](np.asarray(positions, dtype=np.int64)).tolist()

    def next_plan(self):
        """-> (step, source index, rows, spare rows); advances the state."""
        step, s = self.step, self.source_at(self.step)
        name, n, G, b = self.names[s], self.sizes[s], self.global_batch, self.batch_size
        if self.pos[name] + G > n:                  # a batch never spans two epochs (drop the tail)
            self.epoch[name], self.pos[name] = self.epoch[name] + 1, 0
        epoch, start = self.epoch[name], self.pos[name]
        mine = start + self.rank * b
        rows = self._rows(s, epoch, range(mine, mine + b))
        rng = np.random.default_rng([self.seed, step, self.rank, 1])
        n_out = n - G                               # the epoch's positions outside this step's G rows
        picks = rng.choice(n_out, min(self.spares, n_out), replace=False) if n_out > 0 else []
        spares = self._rows(s, epoch, [int(k) if k < start else int(k) + G for k in picks])
        self.pos[name] = start + G
        self.step += 1
        return step, s, rows, spares

    def __iter__(self):
        while True:
            yield self.next_plan()

    def state_dict(self):
        return {"step": self.step, "epoch": dict(self.epoch), "pos": dict(self.pos), "seed": self.seed,
                "global_batch": self.global_batch}

    def load_state_dict(self, d):
        if d.get("seed", self.seed) != self.seed:
            raise ValueError(f"sampler state for seed {d.get('seed')} cannot resume seed {self.seed}")
        if "pos" not in d:
            raise ValueError(f"a sampler state without positions per source ({sorted(d)}): written by a loader "
                             f"that dealt rows to ranks by stride, whose order this one cannot continue")
        self.step = int(d["step"])
        self.epoch = {name: int(d["epoch"].get(name, 0)) for name in self.names}
        self.pos = {name: int(d["pos"].get(name, 0)) for name in self.names}
