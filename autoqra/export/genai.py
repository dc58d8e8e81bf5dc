"""``genai_config.json``: what ``onnxruntime_genai.Model(DIR)`` reads to run an exported decoder.

The layout follows onnxruntime-genai's configuration reference (decoder file, attention geometry,
input/output names with ``%d`` for the block index, token ids, greedy search defaults). The model
``type`` is the Hugging Face ``model_type`` where genai runs that type as a plain decoder with these
input names (llama, mistral, qwen2, phi3, gemma, ...); any other architecture (e.g. gpt2, whose
genai class expects another cache layout) is declared ``llama``: the generic decoder that reads the
names from this file (checked by decoding in genai after export).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from autoqra.export.decoder import PAST_KEY, PAST_VALUE, PRESENT_KEY, PRESENT_VALUE, DecoderShape

__all__ = ["GENAI_DECODER_TYPES", "genai_config", "write_genai_config"]

#: Hugging Face model types that onnxruntime-genai runs as plain decoders with the names below
GENAI_DECODER_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi", "phi3", "gemma", "gemma2", "granite",
                                 "olmo", "nemotron", "smollm3"})


def _token_id(cfg: Any, name: str, default: int) -> int | list[int]:
    value = getattr(cfg, name, None)
    if value is None:
        generation = getattr(cfg, "generation_config", None)
        value = getattr(generation, name, None)
    return default if value is None else value


def genai_config(model: nn.Module, shape: DecoderShape, filename: str, *, threads: int | None = None,
                 share_buffer: bool = False) -> dict:
    """The config as a dict (see the module docstring). ``share_buffer``: the graph's attention is onnxruntime's
    ``GroupQueryAttention`` everywhere, so genai may pass one maximum-length past/present buffer."""
    cfg = model.config
    eos = _token_id(cfg, "eos_token_id", 0)
    model_type = str(getattr(cfg, "model_type", "llama"))
    session_options: dict[str, Any] = {"log_id": "autoqra", "provider_options": []}
    if threads:
        session_options["intra_op_num_threads"] = threads
    return {
        "model": {
            "bos_token_id": _token_id(cfg, "bos_token_id", 0),
            "context_length": shape.context,
            "decoder": {
                "session_options": session_options,
                "filename": filename,
                "head_size": shape.head_dim,
                "hidden_size": shape.hidden,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": PAST_KEY,
                    "past_value_names": PAST_VALUE,
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": PRESENT_KEY,
                    "present_value_names": PRESENT_VALUE,
                },
                "num_attention_heads": shape.heads,
                "num_hidden_layers": shape.layers,
                "num_key_value_heads": shape.kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": _token_id(cfg, "pad_token_id", eos[0] if isinstance(eos, list) else eos),
            "type": model_type if model_type in GENAI_DECODER_TYPES else "llama",
            "vocab_size": shape.vocab,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": shape.context,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": share_buffer,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def write_genai_config(directory: Path, model: nn.Module, shape: DecoderShape, filename: str, *,
                       threads: int | None = None, share_buffer: bool = False) -> Path:
    path = directory / "genai_config.json"
    config = genai_config(model, shape, filename, threads=threads, share_buffer=share_buffer)
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path
