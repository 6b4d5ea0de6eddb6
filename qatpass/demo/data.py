"""Offline, deterministic text from the Python standard library, split by file.

- `docstring_sentences`: first lines of module / class / function docstrings (part A's sentences).
- `docstring_lines`: the other lines of the training files' docstrings (part A's extra text).
- `source_bytes`: the raw source files as bytes (part B's byte-level LM corpus).
- `docstring_texts`: whole docstrings (the pretrained-LM study's prose).

Files are walked in sorted order under `sysconfig.get_paths()["stdlib"]` (tests, site-packages and
vendored test data skipped); a file is held out when crc32(relative path) % 5 == 0, so the split
never puts text of one file on both sides and does not depend on the walk order.
"""

from __future__ import annotations

import ast
import sysconfig
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "Split",
    "stdlib_files",
    "is_held_out",
    "docstring_sentences",
    "docstring_lines",
    "docstring_texts",
    "source_bytes",
]

_SKIP_PARTS = {"site-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3"}


@dataclass(frozen=True)
class Split:
    """Training and held-out items of one corpus, with how many files each side came from."""

    train: list
    held_out: list
    train_files: int
    held_out_files: int


def stdlib_files(root: Path | None = None) -> list[Path]:
    """Every stdlib *.py file (tests and site-packages excluded), sorted by relative path."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not _SKIP_PARTS & set(p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def is_held_out(rel_path: str, every: int = 5) -> bool:
    """Deterministic by-file split: about 1 file in `every` is held out."""
    return zlib.crc32(rel_path.encode()) % every == 0


def _docstrings(source: str) -> list[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences in old modules
        tree = ast.parse(source)
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return [
        doc.strip() for n in ast.walk(tree) if isinstance(n, kinds) if (doc := ast.get_docstring(n))
    ]


def _first_lines(source: str) -> list[str]:
    return [doc.splitlines()[0].strip() for doc in _docstrings(source)]


SENTENCE_CHARS = (24, 200)  # the length bounds of a docstring line kept as a sentence


def docstring_sentences(
    max_files: int | None = None,
    min_chars: int = SENTENCE_CHARS[0],
    max_chars: int = SENTENCE_CHARS[1],
) -> Split:
    """First docstring lines (deduplicated globally, first occurrence wins), split by file."""
    root = Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    train: list[str] = []
    held: list[str] = []
    counts = [0, 0]
    for path in stdlib_files(root)[:max_files]:
        try:
            lines = _first_lines(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        rel = path.relative_to(root).as_posix()
        side = held if is_held_out(rel) else train
        kept = 0
        for line in lines:
            if min_chars <= len(line) <= max_chars and line not in seen:
                seen.add(line)
                side.append(line)
                kept += 1
        counts[side is held] += kept > 0
    return Split(train, held, counts[0], counts[1])


def docstring_lines(sentences: Split, max_files: int | None = None) -> list[str]:
    """Docstring lines of the training files (`SENTENCE_CHARS` long), other than the first
    lines in `sentences` (a `docstring_sentences` split of the same files) and any line a
    held-out file's docstrings also hold (phrases such as "This method is a coroutine." occur
    on both sides); deduplicated, in walk order."""
    docs = docstring_texts(max_files=max_files, min_chars=0)
    known = set(sentences.train) | set(sentences.held_out)
    known |= {t.strip() for doc in docs.held_out for t in doc.splitlines()}
    lo, hi = SENTENCE_CHARS
    lines = []
    for doc in docs.train:
        for line in (t.strip() for t in doc.splitlines()):
            if lo <= len(line) <= hi and line not in known:
                known.add(line)
                lines.append(line)
    return lines


def docstring_texts(
    max_files: int | None = None, min_chars: int = 200, max_chars: int = 4000
) -> Split:
    """Whole docstrings of `min_chars`..`max_chars` characters (deduplicated), split by file."""
    root = Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    sides: tuple[list[str], list[str]] = ([], [])
    counts = [0, 0]
    for path in stdlib_files(root)[:max_files]:
        try:
            docs = _docstrings(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        held = is_held_out(path.relative_to(root).as_posix())
        kept = [d for d in docs if min_chars <= len(d) <= max_chars and d not in seen]
        seen.update(kept)
        sides[held].extend(kept)
        counts[held] += bool(kept)
    return Split(sides[0], sides[1], counts[0], counts[1])


def source_bytes(max_files: int | None = None, max_bytes_per_file: int = 200_000) -> Split:
    """Each stdlib file's source as bytes, split by file (items are `bytes`)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train: list[bytes] = []
    held: list[bytes] = []
    for path in stdlib_files(root)[:max_files]:
        data = path.read_bytes()[:max_bytes_per_file]
        if data:
            (held if is_held_out(path.relative_to(root).as_posix()) else train).append(data)
    return Split(train, held, len(train), len(held))
