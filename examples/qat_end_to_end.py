"""The QAT vs PTQ accuracy study (`qatpass demo`): both parts, one table, results.json, PNGs.

    python examples/qat_end_to_end.py [--quick] [--out DIR] [--model DIR] [--part a|b|both]

Part A: all-MiniLM-L6-v2 sentence embeddings, INT4 PTQ vs QAT by distillation from fp32.
Part B: a byte-level Llama trained from scratch; PTQ vs QAT, both served in INT4.
The code lives in `qatpass/demo/` (data, part_a, part_b, plots, report); this file runs it.
"""

from __future__ import annotations

import sys

from qatpass.demo import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
