"""`qatpass diff MODEL_SPEC [--group-size N] [--exclude REGEX ...] [--html PATH] [--json PATH]`.

MODEL_SPEC is either `package.module:factory`, an importable callable returning
`(model, example_inputs)`, or a local Hugging Face model directory (loaded with
`AutoModelForCausalLM.from_pretrained`, never downloaded; the input is random token ids).
Prints the text table; writes the HTML page and/or the JSON report when asked.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qatpass.config import DEFAULT_EXCLUDE, MODES

__all__ = ["main", "load_model_spec"]


class SpecError(ValueError):
    """A MODEL_SPEC that cannot be loaded."""


def _from_factory(spec: str) -> tuple[nn.Module, Any]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise SpecError(f"MODEL_SPEC {spec!r} must be 'module:factory' or a model directory")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: modules next to the user resolve
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise SpecError(f"cannot import module {module_name!r} of MODEL_SPEC {spec!r}: {e}") from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise SpecError(f"{module_name!r} has no callable {attr!r} (MODEL_SPEC {spec!r})")
    result = factory()
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module)):
        raise SpecError(
            f"factory {spec!r} must return (model, example_inputs), got {type(result).__name__}"
        )
    return result


def _from_hf_dir(path: Path, seq_len: int, seed: int) -> tuple[nn.Module, Any]:
    if not (path / "config.json").is_file():
        raise SpecError(f"{str(path)!r} is a directory without config.json: not a HF model dir")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    vocab = int(model.config.vocab_size)
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (1, seq_len), generator=generator)
    return model, (input_ids,)


def load_model_spec(spec: str, seq_len: int = 16, seed: int = 0) -> tuple[nn.Module, Any]:
    """(model, example_inputs) for a MODEL_SPEC (see the module docstring)."""
    path = Path(spec)
    if path.is_dir():
        return _from_hf_dir(path, seq_len, seed)
    if ":" in spec:
        return _from_factory(spec)
    raise SpecError(f"MODEL_SPEC {spec!r} is neither an existing directory nor 'module:factory'")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qatpass diff",
        description="Show what the qat4 pass does to a model's graphs, and the accuracy each "
        "quantized layer loses.",
    )
    p.add_argument("model_spec", metavar="MODEL_SPEC", help="module:factory or a HF model dir")
    p.add_argument("--group-size", type=int, default=None, help="INT4 group size (default 32)")
    p.add_argument(
        "--exclude",
        metavar="REGEX",
        nargs="+",
        action="extend",
        default=[],
        help="leave parameters matching REGEX alone (in addition to the defaults: embeddings, "
        "lm_head, routers)",
    )
    p.add_argument("--no-default-exclude", action="store_true", help="drop the default excludes")
    p.add_argument("--include", metavar="REGEX", nargs="+", action="extend", default=[])
    p.add_argument("--mode", choices=MODES, default="train")
    p.add_argument("--seq-len", type=int, default=16, help="input length for a HF model dir")
    p.add_argument("--html", type=Path, help="write the HTML page here")
    p.add_argument("--json", type=Path, help="write the JSON report here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from qatpass.graph_diff.diff_model import diff

    options: dict[str, Any] = {"mode": args.mode}
    if args.group_size is not None:
        options["group_size"] = args.group_size
    if args.include:
        options["include"] = tuple(args.include)
    defaults = () if args.no_default_exclude else DEFAULT_EXCLUDE
    options["exclude"] = (*defaults, *args.exclude)
    try:
        model, example_inputs = load_model_spec(args.model_spec, seq_len=args.seq_len)
        report = diff(model, example_inputs, **options)
    except (SpecError, ValueError, TypeError) as e:
        print(f"qatpass diff: error: {e}", file=sys.stderr)
        return 2
    print(report.text())
    if args.html:
        print(f"\nwrote {report.to_html(args.html)}")
    if args.json:
        print(f"wrote {report.to_json(args.json)}")
    return 0
