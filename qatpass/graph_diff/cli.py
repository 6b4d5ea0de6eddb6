"""`qatpass diff MODEL_SPEC [--group-size N] [--exclude REGEX ...] [--html PATH] [--json PATH]`.

The model comes from `qatpass.model_spec.load_model_spec` (the loader `qatpass export` uses too;
MODEL_SPEC forms and the factory contract are in `--help`). Prints the text table; writes the
HTML page and/or the JSON report when asked.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from qatpass.config import DEFAULT_EXCLUDE, MODES
from qatpass.model_spec import MODEL_SPEC_HELP, SpecError, load_model_spec

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qatpass diff",
        description="Show what the qat4 pass does to a model's graphs, and the accuracy each "
        "quantized layer loses.",
        epilog=MODEL_SPEC_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model_spec", metavar="MODEL_SPEC", help="see MODEL_SPEC below")
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
    p.add_argument("--seq-len", type=int, default=16, help="example length for an HF model")
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
