"""`qatpass export`: write a model as a compressed-tensors checkpoint, an ONNX file or a .pt2.

    qatpass export --format compressed-tensors --model MODEL_SPEC --out DIR [--group-size N]
    qatpass export --format onnx|pt2 --model MODEL_SPEC --out FILE [--group-size N] [--overwrite]

MODEL_SPEC is `package.module:factory` (a callable returning `(model, example_inputs)`) or a local
HF transformers model directory (example input: token ids [1, 8]).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qatpass.config import QatConfig

__all__ = ["main", "load_model_spec"]

FORMATS = ("compressed-tensors", "onnx", "pt2")


class LogitsOnly(nn.Module):
    """An HF causal LM as `ids -> logits` (no cache), the form ONNX and torch.export want."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, use_cache=False).logits


def load_model_spec(spec: str) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """(model, example_inputs) from `module:factory` or a local HF model directory."""
    path = Path(spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is a directory without config.json (not an HF model)")
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        vocab = int(getattr(model.config, "vocab_size", 2))
        return model.eval(), (torch.randint(0, vocab, (1, 8)),)
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"model spec {spec!r} is neither 'module:factory' nor a local directory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import {module_name!r} for model spec {spec!r}: {e}") from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"{module_name} has no callable {attr!r}")
    result = factory()
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module)):
        raise TypeError(f"{spec} must return (model, example_inputs), got {type(result).__name__}")
    model, inputs = result
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    return model, inputs


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qatpass export", description=__doc__.split("\n")[0])
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--model", required=True, help="module:factory or a local HF model directory")
    p.add_argument("--out", required=True, type=Path, help="output directory or file")
    p.add_argument("--group-size", type=int, default=None, help="INT4 group size (-1: per channel)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return p


def _export(args: argparse.Namespace) -> Path:
    options: dict[str, Any] = {}
    if args.group_size is not None:
        options["group_size"] = args.group_size
    config = QatConfig.from_options(options)
    model, inputs = load_model_spec(args.model)
    if args.format == "compressed-tensors":
        from qatpass.export.compressed_tensors import save_compressed_tensors

        return save_compressed_tensors(model, args.out, config, overwrite=args.overwrite)
    if args.out.exists() and not args.overwrite:
        raise FileExistsError(f"{args.out} exists; pass --overwrite to replace it")
    from qatpass.lowering import convert

    qmodel = convert(model, config)
    if hasattr(qmodel, "config") and hasattr(qmodel.config, "model_type"):
        qmodel = LogitsOnly(qmodel)
    if args.format == "onnx":
        from qatpass.export.onnx import to_onnx

        return to_onnx(qmodel, inputs, args.out)
    from qatpass.export.torch_export import to_pt2

    return to_pt2(qmodel, inputs, args.out)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        out = _export(args)
    except (ValueError, TypeError, OSError) as e:
        print(f"qatpass export: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.format} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
