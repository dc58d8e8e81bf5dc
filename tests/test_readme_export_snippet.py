"""The README's export section: its onnxruntime-genai snippet runs, as printed, on a folder `export_onnx` wrote."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
og = pytest.importorskip("onnxruntime_genai")

import torch  # noqa: E402
from tiny_hf_dir import WORDS  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import GPT2TokenizerFast, LlamaConfig, LlamaForCausalLM  # noqa: E402

import autoqra  # noqa: E402

README = Path(__file__).resolve().parent.parent / "README.md"

pytestmark = pytest.mark.usefixtures("one_thread")


def _export_snippet() -> str:
    """The first ```python block of the README's "Export for edge runtimes" section."""
    text = README.read_text()
    section = text[text.index("## Export for edge runtimes"):]
    section = section[:section.index("\n## ", 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "the README's export section has no python snippet"
    return blocks[0]


def _byte_level_tokenizer() -> GPT2TokenizerFast:
    """A 300-token byte-level BPE tokenizer trained in code (onnxruntime-genai's tokenizer reads BPE files; it
    cannot parse a word-level one)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([" ".join(WORDS)] * 20, trainer)
    return GPT2TokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                             unk_token="<|endoftext|>")


def test_readme_genai_snippet_runs_on_an_exported_folder(tmp_path, monkeypatch) -> None:
    snippet = _export_snippet()
    assert 'og.Model("out/onnx")' in snippet  # the folder the README's Use section exports to
    tokenizer = _byte_level_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id)).eval()
    autoqra.compile(model, "9bits", bits=(4, 8), ranks=(4,), objective="deploy", select=False, cache_dir=None,
                    progress=False)
    monkeypatch.chdir(tmp_path)
    autoqra.export_onnx(model, "out/onnx", tokenizer=tokenizer)
    namespace: dict = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(snippet, str(README), "exec"), namespace)  # noqa: S102 - the README's own code
    sequence = list(namespace["generator"].get_sequence(0))
    prompt = tokenizer("The quantized model runs on the edge because")["input_ids"]
    assert sequence[:len(prompt)] == prompt and len(prompt) < len(sequence) <= 64  # it generated
    assert printed.getvalue().strip() == namespace["tokenizer"].decode(sequence).strip()
