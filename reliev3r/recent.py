"""A mapping that forgets: :class:`Recent` keeps the keys most recently set or recalled, up to a
bound. The stages remember what they have seen (features of recent frames, ids of evicted
windows, the labeler each source's last window went to, problems already logged) without
growing for as long as a run lives."""

from __future__ import annotations

from collections import OrderedDict


class Recent(OrderedDict):
    """An ``OrderedDict`` of at most ``keep`` keys: setting a key makes it the most recent and
    drops the least recent beyond ``keep`` (``keep`` 0 keeps nothing); :meth:`recall` reads a
    value and makes its key the most recent; plain reads (``get``, ``in``) change no order. Not
    thread-safe: a caller shared between threads holds its own lock around each use."""

    def __init__(self, keep: int):
        super().__init__()
        if keep < 0:
            raise ValueError(f"keep must be >= 0, got {keep}")
        self.keep = keep

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.keep:
            self.popitem(last=False)

    def recall(self, key, default=None):
        """The value of ``key`` (now the most recent), or ``default`` when absent."""
        if key not in self:
            return default
        self.move_to_end(key)
        return super().__getitem__(key)

    def __reduce__(self):  # pickling and copy keep the bound
        return (type(self), (self.keep,), None, None, iter(self.items()))
