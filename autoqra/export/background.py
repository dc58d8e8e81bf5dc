"""`export_in_background`: `export_onnx` in a child process while the caller keeps working.

Most of an export is torch's ONNX exporter tracing the model: single-threaded Python (SmolLM2-135M:
``torch.export`` 12 s and its decompositions 15 s of a 40 s export on a 2-core VM). A caller with
other work (``autoqra demo`` evaluates and compiles its uniform rows meanwhile) can run it in a
child process instead:

* the compiled model goes to the child through `autoqra.save` in a temporary folder, with the
  model's config (and generation config), its attention implementation and dtype, and the tokenizer;
* the child (``python -m autoqra.export.background JOB``) rebuilds it with `autoqra.load` on a model
  built from that config (the same tensors, so the same logits), runs `export_onnx` with the given
  arguments, and writes its `OnnxExportResult` as JSON, or its error;
* `BackgroundExport.wait` returns that result, or raises the child's error (the same class for
  autoqra's own errors, `ExportError` with the child's log otherwise). `BackgroundExport.close` (or
  leaving the ``with`` block) stops a child still running and removes the temporary folder.

**Cores.** While the child runs, the caller's torch threads are lowered so that the two processes
together use the cores torch would use alone (the child gets one thread, the caller the rest, at
least one), and restored by `wait` / `close`. Oversubscribing instead costs more than it overlaps:
on 2 cores, an export (41.6 s alone) beside six 6-window evaluations (26.1 s alone with 2 threads)
took 105.9 s / 113.7 s with 2 threads each, 51.4 s / 69.2 s with 1 and 2 threads, and **44.2 s /
50.0 s with one thread each**, against 67.7 s one after the other (benchmarks/RESULTS.md). The
caller's results do not depend on its thread count (torch's CPU kernels here give the same bits with
1 and 2 threads; checked on the demo's perplexities).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autoqra import errors
from autoqra.errors import ConfigError, ExportError, require_module

__all__ = ["BackgroundExport", "export_in_background"]

logger = logging.getLogger(__name__)

#: the `export_onnx` arguments the child accepts (JSON values); ``tokenizer`` travels as files, and
#: the child shows no progress bar
_ARGUMENTS = frozenset({"with_past", "adapters", "opset", "accuracy_level", "verify_export", "rtol", "decode_steps",
                        "verify_genai", "fuse_layers", "attention", "genai_threads", "overwrite"})
_LOG_TAIL = 4000


class BackgroundExport:
    """A running (or finished) child export; see the module docstring."""

    def __init__(self, process: subprocess.Popen[bytes], job: Path, caller_threads: int | None) -> None:
        self._process = process
        self._job = job
        self._caller_threads = caller_threads
        self._result: Any = None

    def __enter__(self) -> BackgroundExport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def running(self) -> bool:
        return self._process.poll() is None

    def poll(self) -> bool:
        """True while the child runs; once it has ended, the caller gets its torch threads back at once
        (its result waits for `wait`). Call it between steps of the work that overlaps the export."""
        if self.running:
            return True
        self._give_back_threads()
        return False

    def _give_back_threads(self) -> None:
        if self._caller_threads is not None:
            torch.set_num_threads(self._caller_threads)
            self._caller_threads = None

    def wait(self, timeout: float | None = None) -> Any:
        """Wait for the child; return its `OnnxExportResult` or raise its error (see the module docstring)."""
        if self._result is not None:
            return self._result
        try:
            code = self._process.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise ExportError(f"the background export did not finish within {timeout} s; wait longer, or call "
                              "close() to stop it") from exc
        try:
            self._result = self._read(code)
        finally:
            self.close()
        return self._result

    def _read(self, code: int) -> Any:
        from autoqra.export.onnx_export import OnnxExportResult

        result_file = self._job / "result.json"
        log = (self._job / "worker.log").read_text(errors="replace") if (self._job / "worker.log").exists() else ""
        data = json.loads(result_file.read_text()) if result_file.exists() else None
        if data is not None and "result" in data:
            return OnnxExportResult.from_dict(data["result"])
        if data is not None and "error" in data:
            cls = getattr(errors, data["error"], None)
            error = None
            if isinstance(cls, type) and issubclass(cls, errors.AutoQRAError):
                try:
                    error = cls(data["message"])
                    if isinstance(error, errors.ExportVerificationError):  # where the failed files were kept
                        error.measured = dict(data.get("measured") or {})
                        error.directory = None if data.get("directory") is None else Path(data["directory"])
                except TypeError:  # an error class with required keyword arguments
                    error = None
            if error is not None:
                raise error
            raise ExportError(f"the background export failed: {data['error']}: {data['message']}")
        raise ExportError(f"the background export process ended with exit code {code} and no result; its log "
                          f"ends:\n{log[-_LOG_TAIL:]}")

    def close(self) -> None:
        """Stop the child if it still runs, give the caller its threads back, remove the temporary folder."""
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()
            logger.warning("stopped the background export before it finished")
        self._give_back_threads()
        shutil.rmtree(self._job, ignore_errors=True)


def export_in_background(model: nn.Module, path: str | Path, *, tokenizer: Any = None, share_cores: bool = True,
                         **export_args: Any) -> BackgroundExport:
    """Start `export_onnx(model, path, tokenizer=tokenizer, **export_args)` in a child process and
    return at once (after saving the model for it: ~1 s for SmolLM2-135M). The model must not be
    needed unchanged by the export afterwards: the child works on the saved copy. ``share_cores``:
    lower the caller's torch threads while the child runs (see the module docstring)."""
    from autoqra.export.onnx_export import _check_dependencies, _model_dtype, check_export_target
    from autoqra.io import save

    require_module(model, "export_in_background", hint="pass the compiled model")
    unknown = sorted(set(export_args) - _ARGUMENTS)
    if unknown:
        raise ConfigError(f"export_in_background cannot pass {unknown} to the child; it takes "
                          f"{sorted(_ARGUMENTS)} (and tokenizer=)")
    target = check_export_target(path, export_args.get("overwrite", False))  # the cheap checks before the save
    dtype = _model_dtype(model)  # a model mixing float dtypes is refused here, not in the child
    _check_dependencies(export_args.get("verify_genai") is True)
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise ConfigError("export_in_background needs a Hugging Face model (one with a config) to rebuild it in the "
                          "child; call export_onnx directly for other models")
    job = Path(tempfile.mkdtemp(prefix="autoqra-export-"))
    try:
        save(model, job / "model")
        config.save_pretrained(str(job / "config"))
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(str(job / "config"))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(job / "tokenizer"))
        (job / "job.json").write_text(json.dumps({
            "path": str(target.resolve()), "arguments": export_args, "tokenizer": tokenizer is not None,
            "attn_implementation": getattr(config, "_attn_implementation", None),
            "dtype": str(dtype).removeprefix("torch."),
        }, indent=1) + "\n")
        log = (job / "worker.log").open("wb")
        # the child imports this very autoqra, also when the caller put it on sys.path by hand (not installed)
        root = str(Path(__file__).resolve().parents[2])
        path_env = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONPATH": path_env}
        process = subprocess.Popen([sys.executable, "-m", "autoqra.export.background", str(job)], stdout=log,
                                   stderr=subprocess.STDOUT, env=env)
        log.close()
    except BaseException:
        shutil.rmtree(job, ignore_errors=True)
        raise
    caller = None
    if share_cores:
        caller = torch.get_num_threads()
        torch.set_num_threads(max(1, caller - 1))
    logger.info("exporting to %s in a background process (pid %d)", path, process.pid)
    return BackgroundExport(process, job, caller)


def _child(job: Path) -> None:
    """The child's work (``python -m autoqra.export.background JOB``)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from autoqra.export.onnx_export import export_onnx
    from autoqra.io import load

    torch.set_num_threads(1)
    spec = json.loads((job / "job.json").read_text())
    config = AutoConfig.from_pretrained(str(job / "config"))
    kwargs: dict[str, Any] = {"dtype": getattr(torch, spec["dtype"])}
    if spec["attn_implementation"]:
        kwargs["attn_implementation"] = spec["attn_implementation"]
    base = AutoModelForCausalLM.from_config(config, **kwargs)
    if (job / "config" / "generation_config.json").exists():
        base.generation_config = GenerationConfig.from_pretrained(str(job / "config"))
    model = load(job / "model", base).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(job / "tokenizer")) if spec["tokenizer"] else None
    result = export_onnx(model, spec["path"], tokenizer=tokenizer, progress=False, **spec["arguments"])
    (job / "result.json").write_text(json.dumps({"result": result.as_dict()}) + "\n")


def main(argv: list[str] | None = None) -> int:
    job = Path((argv if argv is not None else sys.argv[1:])[0])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        _child(job)
    except Exception as exc:  # handed to the caller, which raises it
        logger.exception("background export failed")
        failure = {"error": type(exc).__name__, "message": str(exc), "measured": getattr(exc, "measured", None),
                   "directory": None if getattr(exc, "directory", None) is None else str(exc.directory)}
        (job / "result.json").write_text(json.dumps(failure) + "\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
