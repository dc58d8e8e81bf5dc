"""Progress bars done one way: ``progress=False`` (or ``--quiet``) turns them off; otherwise tqdm
decides (``disable=None``), so a log file or a pipe gets no carriage-return updates and the
``TQDM_DISABLE`` environment variable is respected."""

from __future__ import annotations

__all__ = ["tqdm_disable"]


def tqdm_disable(progress: bool | None, *, also: bool = False) -> bool | None:
    """tqdm's ``disable=`` for a ``progress`` flag: True when the user asked for quiet (or ``also``),
    else None (tqdm's own terminal detection)."""
    return True if progress is False or also else None
