"""Load the model a CLI works on from a MODEL_SPEC: the one loader `qatpass export` and `qatpass diff`
share.

    load_model_spec("mymodels:tiny")          # module:factory, importable from the current directory
    load_model_spec("path/to/file.py:tiny")   # a Python file and a factory in it
    load_model_spec("path/to/hf_model_dir")   # a local HF transformers directory (config.json)

The factory contract (`MODEL_SPEC_HELP`, printed by both CLIs' `--help`): a callable taking no
arguments that returns `(model, example_inputs)` or just a model. example_inputs is a tensor, a
tuple of positional tensors or a dict of keyword tensors. A bare model must be a transformers
model; it gets the same example as an HF directory: random token ids (or pixel values) of batch 2,
since a batch-1 example would be specialised by torch.export, and `decoder_input_ids` of another
length for encoder-decoder models.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["MODEL_SPEC_HELP", "SpecError", "hf_example_inputs", "load_model_spec"]

MODEL_SPEC_HELP = """\
MODEL_SPEC is one of
  module:factory          a module importable from the current directory (or sys.path)
  path/to/file.py:factory a Python file
  path/to/hf_dir          a local HF transformers model directory (config.json; never downloaded)
The factory is called with no arguments and returns (model, example_inputs) or just a model.
example_inputs: a tensor, a tuple of positional tensors or a dict of keyword tensors
(e.g. {"input_ids": ..., "attention_mask": ...}). A bare transformers model, like an HF
directory, gets random input_ids of batch 2 (plus decoder_input_ids for encoder-decoders)."""

EXAMPLE_BATCH = 2  # > 1: torch.export specialises a size-1 dim


class SpecError(ValueError):
    """A MODEL_SPEC that cannot be loaded."""


def hf_example_inputs(
    model: nn.Module, seq_len: int = 16, batch: int = EXAMPLE_BATCH, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random example inputs for a transformers model, by its `main_input_name`."""
    config = getattr(model, "config", None)
    name = getattr(model, "main_input_name", None)
    if config is None or name is None:
        raise SpecError(
            f"{type(model).__name__} is not a transformers model; its factory must return "
            "(model, example_inputs)"
        )
    generator = torch.Generator().manual_seed(seed)
    if name == "input_ids":
        vocab = int(config.get_text_config().vocab_size)
        inputs = {"input_ids": torch.randint(0, vocab, (batch, seq_len), generator=generator)}
        if getattr(config, "is_encoder_decoder", False):
            dec_len = max(seq_len // 2, 2)  # another length: the decoder's seq dim is its own
            ids = torch.randint(0, vocab, (batch, dec_len), generator=generator)
            inputs["decoder_input_ids"] = ids
        return inputs
    if name == "pixel_values":
        size = config.image_size
        hw = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        shape = (batch, int(config.num_channels), *hw)
        return {"pixel_values": torch.randn(shape, generator=generator)}
    raise SpecError(
        f"{type(model).__name__} takes {name!r}, for which qatpass builds no example; give a "
        "factory that returns (model, example_inputs)"
    )


def _from_hf_dir(path: Path, seq_len: int, seed: int) -> tuple[nn.Module, Any]:
    if not (path / "config.json").is_file():
        raise SpecError(f"{str(path)!r} is a directory without config.json: not a HF model dir")
    import transformers

    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    architectures = getattr(config, "architectures", None) or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    if cls is None:
        cls = transformers.AutoModelForCausalLM
    model = cls.from_pretrained(path, local_files_only=True).eval()
    return model, hf_example_inputs(model, seq_len, seed=seed)


def _import(module_part: str, spec: str) -> Any:
    if module_part.endswith(".py"):
        path = Path(module_part).resolve()
        if not path.is_file():
            raise SpecError(f"MODEL_SPEC {spec!r}: no file {str(path)!r}")
        name = f"qatpass_model_spec_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise SpecError(f"MODEL_SPEC {spec!r}: cannot load {str(path)!r} as Python")
        if str(path.parent) not in sys.path:
            sys.path.insert(0, str(path.parent))  # like `python file.py`: its siblings import
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
        return module
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: modules next to the user resolve
    try:
        return importlib.import_module(module_part)
    except ImportError as e:
        raise SpecError(f"cannot import module {module_part!r} of MODEL_SPEC {spec!r}: {e}") from e


def _from_factory(spec: str, seq_len: int, seed: int) -> tuple[nn.Module, Any]:
    module_part, _, attr = spec.rpartition(":")
    if not module_part or not attr:
        raise SpecError(f"MODEL_SPEC {spec!r} must be 'module:factory' or a model directory")
    factory = getattr(_import(module_part, spec), attr, None)
    if not callable(factory):
        raise SpecError(f"{module_part!r} has no callable {attr!r} (MODEL_SPEC {spec!r})")
    result = factory()
    if isinstance(result, nn.Module):
        return result, hf_example_inputs(result, seq_len, seed=seed)
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module)):
        raise SpecError(
            f"factory {spec!r} must return (model, example_inputs) or a model, "
            f"got {type(result).__name__}"
        )
    model, example_inputs = result
    if not isinstance(example_inputs, (torch.Tensor, tuple, list, Mapping)):
        raise SpecError(
            f"factory {spec!r} returned example_inputs of type {type(example_inputs).__name__}; "
            "give a tensor, a tuple of tensors or a dict of keyword tensors"
        )
    return model, example_inputs


def load_model_spec(spec: str, seq_len: int = 16, seed: int = 0) -> tuple[nn.Module, Any]:
    """(model, example_inputs) for a MODEL_SPEC (see `MODEL_SPEC_HELP`).

    `seq_len` and `seed` shape the random example built for an HF directory or a bare
    transformers model; a factory's own example_inputs are returned as they are.
    """
    if not isinstance(spec, str) or not spec:
        raise SpecError(f"MODEL_SPEC must be a non-empty string, got {spec!r}")
    path = Path(spec)
    if path.is_dir():
        return _from_hf_dir(path, seq_len, seed)
    if ":" in spec:
        return _from_factory(spec, seq_len, seed)
    raise SpecError(
        f"MODEL_SPEC {spec!r} is neither an existing directory nor 'module:factory' "
        "(or 'path/to/file.py:factory')"
    )
