"""`qatpass` command line: `qatpass demo`, `qatpass diff MODEL_SPEC`, `qatpass export ...`.

Each subcommand lives with the code it drives; this file only dispatches to them.
"""

from __future__ import annotations

import importlib
import sys

_SUBCOMMANDS = {
    "demo": (
        "qatpass.demo",
        "main",
        "run the QAT vs PTQ accuracy study (examples/qat_end_to_end.py)",
    ),
    "diff": (
        "qatpass.graph_diff.cli",
        "main",
        "show what the pass does to a model's graphs and numbers",
    ),
    "export": ("qatpass.export.cli", "main", "export a model: compressed-tensors, onnx or pt2"),
}


def _usage() -> str:
    lines = ["usage: qatpass {" + ",".join(_SUBCOMMANDS) + "} [args...]", ""]
    lines += [f"  {name:<8} {help_}" for name, (_, _, help_) in _SUBCOMMANDS.items()]
    lines += ["", "qatpass COMMAND --help: its options (diff and export: the MODEL_SPEC forms)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] not in _SUBCOMMANDS:
        print(f"qatpass: unknown command {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func, _ = _SUBCOMMANDS[argv[0]]
    module = importlib.import_module(module_name)
    return int(getattr(module, func)(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
