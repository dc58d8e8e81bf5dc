"""`JsonCache`: small JSON files on disk under keys that cannot go stale.

A key hashes the settings, autoqra's and torch's versions, and the raw bytes, dtype and shape of
every tensor given (any dtype: bf16 / fp16 hash as they are). Files are written to a temporary
name and renamed, so a reader never sees half a file; an unreadable file is a miss (logged).
The error tables (`autoqra.search.estimators.ErrorCache`) and the measured selection
(`autoqra.passes.select`) are stored this way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from autoqra.errors import ConfigError

__all__ = ["JsonCache", "update_with_tensor"]

logger = logging.getLogger(__name__)


def update_with_tensor(h: Any, t: torch.Tensor | None) -> None:
    """Feed a tensor's dtype, shape and raw bytes (any dtype, any device) into the hash ``h``."""
    if t is None:
        h.update(b"none")
        return
    flat = t.detach().contiguous().cpu().reshape(-1)
    h.update(f"{flat.dtype}{tuple(t.shape)}".encode())
    h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")


class JsonCache:
    """JSON payloads in ``root`` (no cache when ``root`` is None), one file ``<prefix><key>.json`` each."""

    def __init__(self, root: Path | None, *, prefix: str = "") -> None:
        self.root = root
        self.prefix = prefix
        if root is not None:
            root.mkdir(parents=True, exist_ok=True)

    def key(self, parts: dict[str, object], tensors: list[torch.Tensor | None]) -> str:
        """Empty when there is no cache (nothing is hashed then)."""
        if self.root is None:
            return ""
        import autoqra

        versions = {"autoqra": autoqra.__version__, "torch": torch.__version__}
        h = hashlib.sha256(json.dumps({**parts, "_versions": versions}, sort_keys=True).encode())
        for t in tensors:
            update_with_tensor(h, t)
        return h.hexdigest()[:40]

    def _path(self, key: str) -> Path:
        if self.root is None:
            raise ConfigError("this cache has no folder (root=None): give it a directory to store entries in")
        return self.root / f"{self.prefix}{key}.json"

    def get_json(self, key: str) -> Any | None:
        if self.root is None or not key:
            return None
        path = self._path(key)
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except ValueError as exc:
            logger.warning("ignoring an unreadable cache file %s (%s)", path, exc)
            return None

    def put_json(self, key: str, payload: Any) -> None:
        if self.root is None or not key:
            return
        fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump(payload, fh)
        os.replace(tmp, self._path(key))
