"""Which stored windows a learner gets: uniform, recency-weighted or loss-prioritised.

Every sampler keeps the stored keys and one weight per key in flat numpy arrays and draws
with replacement, ``P(key) = weight / sum(weights)``. Uniform and recency draws are O(n)
(about 0.1 ms for 10^5 windows; recency weights all change with every insert anyway). The
prioritized sampler keeps its weights in a sum tree as well, so a draw and a priority
update cost O(log n) (Schaul et al.), whatever the store's size.
Each learner rank draws from its own random stream, seeded from ``(seed, rank)``, so a
rank's sequence is reproducible whatever the other ranks do.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np

from replay.config import ReplayConfig

_DEFAULTS = ReplayConfig()
"""Where the samplers' keyword defaults come from (``replay.recency_halflife``,
``replay.priority_alpha``): one default per setting, the config's."""


class Sampler:
    """Uniform over the stored keys. Subclasses change the weights."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        self._keys = np.zeros(16, np.int64)
        self._weights = np.zeros(16, np.float64)
        self._size = 0
        self._pos: dict[int, int] = {}
        self._rngs: dict[int, np.random.Generator] = {}

    def __len__(self) -> int:
        return self._size

    def add(self, key: int, priority: float | None = None) -> None:
        """Track a new key; ``priority`` restores a stored one (else the sampler's default)."""
        if key in self._pos:
            return
        if self._size == len(self._keys):
            self._keys = np.resize(self._keys, 2 * self._size)
            self._weights = np.resize(self._weights, 2 * self._size)
        self._keys[self._size] = key
        self._weights[self._size] = self._initial_weight(priority)
        self._pos[key] = self._size
        self._size += 1

    def remove(self, key: int) -> None:
        i = self._pos.pop(key, None)
        if i is None:
            return
        last = self._size - 1
        if i != last:  # swap the last entry into the hole
            self._keys[i], self._weights[i] = self._keys[last], self._weights[last]
            self._pos[int(self._keys[i])] = i
        self._size = last

    def update(self, keys: Iterable[int], losses: Iterable[float]) -> dict[int, float]:
        """Report per-window losses; return the new priority of each known key."""
        return {}

    def priority(self, key: int) -> float:
        return float(self._weights[self._pos[key]])

    def rng(self, rank: int) -> np.random.Generator:
        if rank not in self._rngs:
            self._rngs[rank] = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, rank])))
        return self._rngs[rank]

    def probabilities(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys, probability of each key in one draw)."""
        keys = self._keys[: self._size]
        w = self._current_weights()
        return keys.copy(), w / w.sum()

    def sample(self, n: int, rank: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Draw ``n`` keys with replacement; return (keys, their probabilities)."""
        if self._size == 0:
            raise ValueError("sample from an empty sampler")
        keys, probs = self.probabilities()
        idx = self.rng(rank).choice(self._size, size=n, p=probs)
        return keys[idx], probs[idx]

    def state_dict(self) -> dict:
        """RNG streams per rank and sampler-specific scalars (the keys come from storage)."""
        return {"seed": self.seed, "rngs": {str(r): g.bit_generator.state for r, g in self._rngs.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self._rngs = {}
        for rank, bit_state in state.get("rngs", {}).items():
            self.rng(int(rank)).bit_generator.state = bit_state

    def _initial_weight(self, priority: float | None) -> float:
        return 1.0

    def _current_weights(self) -> np.ndarray:
        return self._weights[: self._size]


class RecencySampler(Sampler):
    """Weight ``2 ** ((key - newest_key) / halflife)``: a window's chance halves for every
    ``halflife`` windows inserted after it (keys are insertion numbers)."""

    def __init__(self, seed: int = 0, *, halflife: float = _DEFAULTS.recency_halflife):
        super().__init__(seed)
        if halflife <= 0:
            raise ValueError("halflife must be > 0")
        self.halflife = halflife

    def _current_weights(self) -> np.ndarray:
        keys = self._keys[: self._size]
        return np.exp2((keys - keys.max()) / self.halflife)


class SumTree:
    """Binary tree over ``capacity`` (a power of two) leaf weights; each inner node holds
    the sum of its children, ``tree[1]`` the total. Parents are recomputed from their
    children (not patched by deltas), so sums never drift."""

    def __init__(self, capacity: int):
        if capacity < 1 or capacity & (capacity - 1):
            raise ValueError("capacity must be a power of two")
        self.capacity = capacity
        self.tree = np.zeros(2 * capacity, np.float64)

    @property
    def total(self) -> float:
        return float(self.tree[1])

    def set(self, positions, weights) -> None:
        i = np.asarray(positions, np.int64).reshape(-1) + self.capacity
        if i.size == 0:
            return
        self.tree[i] = weights
        while i[0] > 1 or i.size > 1:
            i = np.unique(i // 2)
            self.tree[i] = self.tree[2 * i] + self.tree[2 * i + 1]

    def build(self, weights: np.ndarray) -> None:
        """Set leaves ``0..len(weights)`` (the rest zero) and every sum, level by level."""
        self.tree[:] = 0.0
        self.tree[self.capacity: self.capacity + len(weights)] = weights
        lo = self.capacity
        while lo > 1:
            lo //= 2
            self.tree[lo: 2 * lo] = self.tree[2 * lo: 4 * lo: 2] + self.tree[2 * lo + 1: 4 * lo: 2]

    def find(self, mass: np.ndarray) -> np.ndarray:
        """Leaf positions whose cumulative-weight interval holds each of ``mass`` (in [0, total))."""
        u = np.array(mass, np.float64)
        i = np.ones(len(u), np.int64)
        while i[0] < self.capacity:  # every query descends the same number of levels
            left = self.tree[2 * i]
            right = u >= left
            u -= np.where(right, left, 0.0)
            i = 2 * i + right
        return i - self.capacity


class PrioritizedSampler(Sampler):
    """Weight ``loss ** alpha`` from the losses learners report; a new window gets the
    largest priority seen so far, so it is drawn soon (Schaul et al., prioritised replay).
    Draws and updates go through a :class:`SumTree`: O(log n) each."""

    def __init__(self, seed: int = 0, *, alpha: float = _DEFAULTS.priority_alpha, eps: float = 1e-6):
        super().__init__(seed)
        if alpha < 0:
            raise ValueError("alpha must be >= 0")
        self.alpha, self.eps = alpha, eps
        self.max_priority = 1.0
        self._tree = SumTree(len(self._keys))

    def add(self, key: int, priority: float | None = None) -> None:
        if key in self._pos:
            return
        super().add(key, priority)
        if len(self._keys) > self._tree.capacity:  # the arrays doubled: so does the tree
            self._tree = SumTree(len(self._keys))
            self._tree.build(self._weights[: self._size])
        else:
            self._tree.set([self._size - 1], self._weights[self._size - 1])

    def remove(self, key: int) -> None:
        i = self._pos.get(key)
        if i is None:
            return
        super().remove(key)  # the last entry moved into position i
        if i < self._size:
            self._tree.set([i, self._size], [self._weights[i], 0.0])
        else:
            self._tree.set([i], [0.0])

    def sample(self, n: int, rank: int = 0) -> tuple[np.ndarray, np.ndarray]:
        if self._size == 0:
            raise ValueError("sample from an empty sampler")
        total = self._tree.total
        if not total > 0:  # every reported loss was 0 (weights eps**alpha underflowed): uniform
            idx = self.rng(rank).integers(0, self._size, n)
            return self._keys[idx].copy(), np.full(n, 1.0 / self._size)
        # rounding in the sums could point one past the last leaf: clamp to it
        idx = np.minimum(self._tree.find(self.rng(rank).random(n) * total), self._size - 1)
        return self._keys[idx].copy(), self._weights[idx] / total

    def update(self, keys: Iterable[int], losses: Iterable[float]) -> dict[int, float]:
        out = {}
        for key, loss in zip(keys, losses):
            i = self._pos.get(int(key))
            loss = float(loss)
            if i is None or not math.isfinite(loss):
                continue
            p = (abs(loss) + self.eps) ** self.alpha
            self._weights[i] = p
            self.max_priority = max(self.max_priority, p)
            out[int(key)] = p
        if out:
            pos = np.fromiter((self._pos[k] for k in out), np.int64, len(out))
            self._tree.set(pos, self._weights[pos])
        return out

    def _initial_weight(self, priority: float | None) -> float:
        return self.max_priority if priority is None else float(priority)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "max_priority": self.max_priority}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.max_priority = float(state.get("max_priority", 1.0))


def make_sampler(kind: str, *, seed: int, halflife: float, alpha: float) -> Sampler:
    if kind == "uniform":
        return Sampler(seed)
    if kind == "recency":
        return RecencySampler(seed, halflife=halflife)
    if kind == "prioritized":
        return PrioritizedSampler(seed, alpha=alpha)
    raise ValueError(f"sampler: unknown kind {kind!r}")
