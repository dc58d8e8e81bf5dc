"""The embedded default text (the Lee news corpus) and token windows for calibration and evaluation.

The Lee corpus (300 Australian news articles, ~60k words) ships as
``gensim/test/test_data/lee_background.cor`` inside the gensim 4.4.0 wheel. autoqra fetches that
wheel with ``pip download`` (no install, gensim is never imported), reads the one file out of the
archive and caches it as ``<cache>/lee_background.cor``. The cache folder is ``cache_dir`` when
given, else ``$AUTOQRA_CACHE``, else ``~/.cache/autoqra``.

Protocol (see ``split_tokens`` / ``windows``): tokenize the whole text without special tokens; the
first 60% of the tokens are calibration / fine-tuning data, the last 40% evaluation data; both are
cut into non-overlapping windows that start with the tokenizer's BOS token when the tokenizer
prepends one itself (``window_bos_id``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shlex
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from autoqra.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

#: environment variable that overrides the default cache folder.
CACHE_ENV = "AUTOQRA_CACHE"
#: the pinned gensim release whose wheel carries the Lee corpus.
GENSIM_REQUIREMENT = "gensim==4.4.0"
#: path of the corpus inside the gensim wheel (an sdist prefixes it with ``gensim-4.4.0/``).
LEE_MEMBER = "gensim/test/test_data/lee_background.cor"
LEE_FILENAME = "lee_background.cor"
#: sha256 of the corpus bytes in gensim 4.4.0; ``None`` disables the check.
LEE_SHA256: str | None = "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb"
#: pip flags of a fixed, platform-independent choice of the gensim wheel (tried first, so that
#: every machine reads the same archive); a plain download for this platform is the fallback.
_GENSIM_PINNED_WHEEL_ARGS: tuple[str, ...] = (
    "--only-binary",
    ":all:",
    "--platform",
    "manylinux_2_28_x86_64",
    "--python-version",
    "3.11",
    "--implementation",
    "cp",
    "--abi",
    "cp311",
)
_PIP_TIMEOUT_S = 900


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The autoqra cache folder: ``cache_dir``, else ``$AUTOQRA_CACHE``, else ``~/.cache/autoqra``.

    The folder is not created here.
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "autoqra"


def pip_command(requirement: str, dest: Path, extra_args: Sequence[str] = ()) -> list[str]:
    """The ``pip download`` command line that fetches ``requirement`` (no dependencies) into ``dest``."""
    return [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        *extra_args,
        "-d",
        str(dest),
        requirement,
    ]


def pip_download(requirement: str, dest: Path, extra_args: Sequence[str] = ()) -> None:
    """Run ``pip download --no-deps`` for ``requirement`` into ``dest``.

    Raises:
        DataError: pip failed or could not be started; the message holds the command to run by hand.
    """
    dest.mkdir(parents=True, exist_ok=True)
    cmd = pip_command(requirement, dest, extra_args)
    shown = shlex.join(cmd)
    logger.info("fetching %s: %s", requirement, shown)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DataError(f"could not run pip to fetch {requirement} ({exc}); run by hand: {shown}") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-5:])
        raise DataError(
            f"pip could not fetch {requirement} (exit {proc.returncode}): {tail}\n"
            f"Check network access to PyPI, or run by hand: {shown}"
        )
    logger.debug("pip output: %s", proc.stdout)


def _find_archives(folder: Path, patterns: Sequence[str]) -> list[Path]:
    """Files of ``folder`` matching any of ``patterns``, sorted by name (deterministic)."""
    if not folder.is_dir():
        return []
    found = {p for pattern in patterns for p in folder.glob(pattern) if p.is_file()}
    return sorted(found)


def download_gensim_wheel(wheel_dir: Path) -> Path:
    """Path of the gensim 4.4.0 archive in ``wheel_dir``, downloading it with pip when absent.

    Monkeypatch this function in tests to supply a fake archive without network access.
    """
    patterns = ("gensim-4.4.0-*.whl", "gensim-4.4.0.tar.gz")
    found = _find_archives(wheel_dir, patterns)
    if found:
        return found[0]
    try:
        pip_download(GENSIM_REQUIREMENT, wheel_dir, _GENSIM_PINNED_WHEEL_ARGS)
    except DataError as exc:
        logger.warning("pinned gensim wheel unavailable (%s); trying this platform's wheel", exc)
        pip_download(GENSIM_REQUIREMENT, wheel_dir)
    found = _find_archives(wheel_dir, patterns)
    if not found:
        raise DataError(
            f"pip reported success but no gensim 4.4.0 archive is in {wheel_dir}; run by hand: "
            f"{shlex.join(pip_command(GENSIM_REQUIREMENT, wheel_dir))}"
        )
    return found[0]


def read_archive_member(archive: Path, member_suffix: str) -> bytes:
    """Bytes of the one member of a wheel/zip or ``.tar.gz`` whose path ends with ``member_suffix``.

    Raises:
        DataError: the archive is unreadable or holds no such member.
    """
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for name in zf.namelist():
                    if name == member_suffix or name.endswith("/" + member_suffix):
                        return zf.read(name)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                for info in tf.getmembers():
                    if info.isfile() and (
                        info.name == member_suffix or info.name.endswith("/" + member_suffix)
                    ):
                        handle = tf.extractfile(info)
                        if handle is not None:
                            return handle.read()
        else:
            raise DataError(f"{archive} is neither a zip/wheel nor a tar archive; delete it and retry")
    except (OSError, zipfile.BadZipFile, tarfile.TarError) as exc:
        raise DataError(f"could not read {archive} ({exc}); delete it and retry") from exc
    raise DataError(f"{archive} holds no member {member_suffix!r}; delete it and retry")


def write_atomic(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` through a temporary file and a rename (no half-written cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
        os.chmod(tmp, 0o644)  # mkstemp makes owner-only files; the cache is shared like a download
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def lee_corpus_text(cache_dir: str | os.PathLike[str] | None = None) -> str:
    """The Lee background corpus as text, fetched and cached on first use.

    Raises:
        DataError: the wheel could not be fetched or read, or the file's checksum is wrong.
    """
    root = cache_root(cache_dir)
    cached = root / LEE_FILENAME
    if not cached.is_file():
        archive = download_gensim_wheel(root / "wheels")
        payload = read_archive_member(archive, LEE_MEMBER)
        if LEE_SHA256 is not None and hashlib.sha256(payload).hexdigest() != LEE_SHA256:
            raise DataError(
                f"{LEE_MEMBER} in {archive} does not have the expected sha256 {LEE_SHA256}; "
                "delete the archive and retry"
            )
        write_atomic(cached, payload)
        logger.info("cached the Lee corpus (%d bytes) at %s", len(payload), cached)
    try:
        return cached.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"could not read {cached} ({exc}); delete it and retry") from exc


@dataclass(frozen=True)
class TokenSplits:
    """A token stream cut in two: calibration / fine-tuning first, evaluation last.

    Attributes:
        calibration: 1-D LongTensor, the first ``calib_fraction`` of the tokens.
        evaluation: 1-D LongTensor, the remaining tokens.
        calib_fraction: the fraction used for the cut.
    """

    calibration: torch.Tensor
    evaluation: torch.Tensor
    calib_fraction: float

    @property
    def n_calibration(self) -> int:
        """Number of calibration tokens."""
        return int(self.calibration.numel())

    @property
    def n_evaluation(self) -> int:
        """Number of evaluation tokens."""
        return int(self.evaluation.numel())

    @property
    def n_total(self) -> int:
        """Number of tokens of the whole text."""
        return self.n_calibration + self.n_evaluation


def tokenize_text(text: str, tokenizer: Any) -> torch.Tensor:
    """Token ids of the whole ``text`` (no special tokens added) as a 1-D LongTensor."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def window_bos_id(tokenizer: Any) -> int | None:
    """The BOS token id every window starts with: the tokenizer's BOS when it prepends one itself.

    ``None`` when the tokenizer has no BOS token or does not add it when encoding (GPT-2, Qwen2 and
    SmolLM2 declare a BOS token but never prepend it; their models are scored without one).
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return int(bos) if len(ids) > 0 and ids[0] == bos else None


def split_tokens(text: str, tokenizer: Any, calib_fraction: float = 0.6) -> TokenSplits:
    """Tokenize ``text`` and cut it: the first ``calib_fraction`` of tokens, then the rest.

    Raises:
        ConfigError: ``calib_fraction`` is not strictly between 0 and 1.
    """
    if not 0.0 < calib_fraction < 1.0:
        raise ConfigError(f"calib_fraction must be strictly between 0 and 1, got {calib_fraction!r}")
    tokens = tokenize_text(text, tokenizer)
    cut = int(tokens.numel() * calib_fraction)
    splits = TokenSplits(calibration=tokens[:cut], evaluation=tokens[cut:], calib_fraction=calib_fraction)
    logger.info(
        "tokens: %d total, %d calibration, %d evaluation",
        splits.n_total,
        splits.n_calibration,
        splits.n_evaluation,
    )
    return splits


def windows(
    tokens: torch.Tensor | Sequence[int],
    seq_len: int = 512,
    max_windows: int | None = None,
    bos_token_id: int | None = None,
) -> torch.Tensor:
    """Non-overlapping windows ``[n, seq_len]`` (LongTensor) cut from the start of ``tokens``.

    With ``bos_token_id`` each window is that token followed by ``seq_len - 1`` text tokens;
    without, ``seq_len`` text tokens. A trailing partial window is dropped; ``max_windows`` keeps
    only the first windows.

    Raises:
        ConfigError: ``seq_len < 2`` or ``max_windows < 1``.
        DataError: ``tokens`` is too short for a single window.
    """
    if seq_len < 2:
        raise ConfigError(f"seq_len must be at least 2, got {seq_len}")
    if max_windows is not None and max_windows < 1:
        raise ConfigError(f"max_windows must be positive or None, got {max_windows}")
    flat = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
    body = seq_len - 1 if bos_token_id is not None else seq_len
    n = flat.numel() // body
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise DataError(
            f"{flat.numel()} tokens are too few for one window of {seq_len} tokens; "
            "give a longer text or a smaller seq_len"
        )
    out = flat[: n * body].reshape(n, body)
    if bos_token_id is not None:
        out = torch.cat([torch.full((n, 1), int(bos_token_id), dtype=torch.long), out], dim=1)
    return out.contiguous()


def text_to_token_windows(
    path: str | os.PathLike[str],
    tokenizer: Any,
    *,
    seq_len: int = 512,
    max_windows: int | None = None,
) -> torch.Tensor:
    """Windows ``[n, seq_len]`` of an arbitrary UTF-8 text file, BOS-prefixed as ``window_bos_id`` says.

    Raises:
        DataError: the file cannot be read or is too short for one window.
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"could not read text file {file} ({exc}); give a readable UTF-8 file") from exc
    tokens = tokenize_text(text, tokenizer)
    logger.info("%s: %d tokens", file, tokens.numel())
    return windows(tokens, seq_len=seq_len, max_windows=max_windows, bos_token_id=window_bos_id(tokenizer))


def lee_windows(tokenizer, *, split: str, seq_len: int, n: int | None):
    """Windows of the Lee corpus calibration ("calib") or evaluation ("eval") split."""
    splits = split_tokens(lee_corpus_text(), tokenizer)
    tokens = splits.calibration if split == "calib" else splits.evaluation
    return windows(tokens, seq_len=seq_len, max_windows=n, bos_token_id=window_bos_id(tokenizer))


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
