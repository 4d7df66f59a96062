"""Reverb's SampleToInsertRatio rate limiter: hold sampled windows per inserted window.

With ``diff = inserts * samples_per_insert - samples`` and
``offset = samples_per_insert * min_size``, a sample of ``n`` windows may go ahead while
``diff - n >= offset - tolerance`` and an insert while ``diff + samples_per_insert <=
offset + tolerance``. So a fast learner waits for new data (no overfitting a trickle), and a
fast labeler waits for the learner (no flood it can never look at). Below ``min_size``
stored windows nothing is sampled and inserts are always allowed.
``samples_per_insert = 0`` turns the ratio off: only ``min_size`` applies.

With ``limit_inserts=False`` only the sampling side waits: inserts always go ahead, so the
ratio is an upper bound on how often a window is trained on per window delivered, and the
labelers never wait for the learner. A window delivered again (a near-duplicate of a stored
one: a looped archive's next pass) earns samples as a stored one does (``repeats``), so a
learner on a finite archive keeps training on it pass after pass, at the pace the windows come.
Credit a slow learner leaves unused beyond ``tolerance`` is dropped (``forgone``), so a learner
that fell behind does not later train on new windows more often than the ratio to catch up.
"""

from __future__ import annotations

from replay.config import ReplayConfig


_DEFAULTS = ReplayConfig()
"""Where the limiter's keyword defaults come from (``replay.min_size``,
``replay.samples_per_insert``, ``replay.tolerance``): one default per setting, the config's."""


class RateLimiter:
    def __init__(self, *, min_size: int = _DEFAULTS.min_size, samples_per_insert: float = _DEFAULTS.samples_per_insert,
                 tolerance: float = _DEFAULTS.tolerance, limit_inserts: bool = _DEFAULTS.limit_inserts):
        if min_size < 1:
            raise ValueError("min_size must be >= 1")
        if samples_per_insert < 0:
            raise ValueError("samples_per_insert must be >= 0")
        # A band narrower than one insert's worth of samples could block both sides forever.
        if samples_per_insert > 0 and tolerance < max(1.0, samples_per_insert):
            raise ValueError(f"tolerance must be >= max(1, samples_per_insert) = {max(1.0, samples_per_insert)}")
        self.min_size = min_size
        self.samples_per_insert = samples_per_insert
        self.tolerance = tolerance
        self.limit_inserts = limit_inserts
        self.inserts = 0
        self.deletes = 0
        self.samples = 0
        self.repeats = 0
        """Windows delivered but not stored (``arrive``); they count toward the ratio only with
        ``limit_inserts=False``."""
        self.forgone = 0.0
        """Sampling credit dropped because a slow learner left it unused (``limit_inserts=False``)."""

    @property
    def size(self) -> int:
        return self.inserts - self.deletes

    @property
    def enabled(self) -> bool:
        return self.samples_per_insert > 0

    def _delivered(self) -> int:
        """The windows the ratio counts: those stored, and with ``limit_inserts=False`` those
        delivered again too."""
        return self.inserts + (0 if self.limit_inserts else self.repeats)

    def _diff(self) -> float:
        return self._delivered() * self.samples_per_insert - self.samples - self.forgone

    def _offset(self) -> float:
        return self.samples_per_insert * self.min_size

    def can_insert(self, n: int = 1) -> bool:
        if not self.enabled or not self.limit_inserts or self.size + n <= self.min_size:
            return True
        return self._diff() + n * self.samples_per_insert <= self._offset() + self.tolerance

    def can_sample(self, n: int = 1) -> bool:
        if self.size < self.min_size:
            return False
        if not self.enabled:
            return True
        return self._diff() - n >= self._offset() - self.tolerance

    def insert(self, n: int = 1) -> None:
        self.inserts += n
        self._drop_unused()

    def arrive(self, n: int = 1) -> None:
        """Windows delivered and not stored (near-duplicates of stored ones, ones the reservoir
        declined): with ``limit_inserts=False`` the data came again, and it earns the learner
        its samples as an insert does."""
        self.repeats += n
        self._drop_unused()

    def _drop_unused(self) -> None:
        if self.enabled and not self.limit_inserts:
            self.forgone += max(0.0, self._diff() - (self._offset() + self.tolerance))

    def delete(self, n: int = 1) -> None:
        """Windows that left the store (evicted, found corrupt)."""
        self.deletes += n

    def sample(self, n: int = 1) -> None:
        self.samples += n

    def ratio(self) -> float:
        """Actual samples per window counted so far (the exported metric)."""
        return self.samples / self._delivered() if self._delivered() else 0.0

    def state_dict(self) -> dict:
        return {"inserts": self.inserts, "deletes": self.deletes, "samples": self.samples, "repeats": self.repeats,
                "forgone": self.forgone}

    def load_state_dict(self, state: dict) -> None:
        self.inserts = int(state["inserts"])
        self.deletes = int(state["deletes"])
        self.samples = int(state["samples"])
        self.repeats = int(state.get("repeats", 0))  # these two are absent from states saved before limit_inserts
        self.forgone = float(state.get("forgone", 0.0))
