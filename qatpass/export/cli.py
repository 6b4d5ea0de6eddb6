"""`qatpass export`: write a model as a compressed-tensors checkpoint, an ONNX file or a .pt2.

    qatpass export --format compressed-tensors --model MODEL_SPEC --out DIR [--scheme S] [--group-size N]
    qatpass export --format onnx|pt2 --model MODEL_SPEC --out FILE [--group-size N] [--overwrite]

The model comes from `qatpass.model_spec.load_model_spec` (the loader `qatpass diff` uses too).
ONNX and pt2 export `qatpass.convert(model)` as it is: an HF model's graph returns its logits,
with dynamic batch and sequence dims. Weights left in high precision for their shape or dtype
(not by the include/exclude filters) are logged at WARNING with a count.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from torch import nn

from qatpass.config import QatConfig
from qatpass.model_spec import MODEL_SPEC_HELP, SpecError, load_model_spec

__all__ = ["main"]

FORMATS = ("compressed-tensors", "onnx", "pt2")
log = logging.getLogger("qatpass")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qatpass export",
        description=__doc__.split("\n")[0],
        epilog=MODEL_SPEC_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--model", required=True, metavar="MODEL_SPEC", help="see MODEL_SPEC below")
    p.add_argument("--out", required=True, type=Path, help="output directory or file")
    p.add_argument(
        "--scheme",
        choices=("int4", "nvfp4", "mxfp4"),
        default="int4",
        help="weight format (default int4)",
    )
    p.add_argument("--group-size", type=int, default=None, help="INT4 group size (-1: per channel)")
    p.add_argument("--seq-len", type=int, default=16, help="example length for an HF model")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return p


def warn_unquantizable(model: nn.Module, config: QatConfig) -> int:
    """Log at WARNING the matmul weights the plan leaves in high precision for a reason other than
    its policy and filters (group divisibility, dtype). Returns the count."""
    from qatpass.lowering.convert import module_plan

    plan, _ = module_plan(model, config)
    left = plan.not_by_policy()
    if left:
        shown = "; ".join(f"{s.fqn}: {s.reason}" for s in left[:5])
        more = f"; and {len(left) - 5} more" if len(left) > 5 else ""
        log.warning(
            "%d weight(s) stay in high precision because %s cannot quantize them: %s%s",
            len(left),
            config.scheme,
            shown,
            more,
        )
    return len(left)


def _export(args: argparse.Namespace) -> Path:
    options: dict[str, Any] = {}
    if args.scheme != "int4":
        if args.group_size is not None:
            raise ValueError(
                f"--group-size is an INT4 option; {args.scheme} has a fixed block size"
            )
        options["scheme"] = args.scheme
    elif args.group_size is not None:
        options["group_size"] = args.group_size
    config = QatConfig.from_options(options)
    if args.format != "compressed-tensors" and args.out.exists() and not args.overwrite:
        raise FileExistsError(f"{args.out} exists; pass --overwrite to replace it")
    model, inputs = load_model_spec(args.model, seq_len=args.seq_len)
    warn_unquantizable(model, config)
    if args.format == "compressed-tensors":
        from qatpass.export.compressed_tensors import save_compressed_tensors

        return save_compressed_tensors(model, args.out, config, overwrite=args.overwrite)
    from qatpass.lowering import convert

    qmodel = convert(model, config)
    if args.format == "onnx":
        from qatpass.export.onnx import to_onnx

        return to_onnx(qmodel, inputs, args.out)
    from qatpass.export.torch_export import to_pt2

    return to_pt2(qmodel, inputs, args.out)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    try:
        out = _export(args)
    except (SpecError, ValueError, TypeError, OSError) as e:
        print(f"qatpass export: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.format} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
