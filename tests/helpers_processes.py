"""What the tests that kill real processes share."""

from __future__ import annotations

from pathlib import Path


def running(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie left for whoever reaps orphans does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")
