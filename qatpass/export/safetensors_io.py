"""Write and read (sharded) safetensors checkpoints safely: all or nothing, clear errors.

A checkpoint directory is written into a temporary sibling and renamed into place, so a failure
never leaves a half-written directory; an existing non-empty directory is only replaced with
`overwrite=True`. Reading wraps every safetensors error with the file name and checks the index.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

__all__ = [
    "SINGLE_FILE",
    "INDEX_FILE",
    "parse_size",
    "atomic_dir",
    "write_shards",
    "read_tensors",
]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes of a size given as an int or a string like "5GB", "500MB", "2GiB"."""
    if isinstance(size, bool):
        raise TypeError("max_shard_size must be an int or a string like '5GB', got a bool")
    if isinstance(size, int):
        value = size
    elif isinstance(size, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", size)
        if m is None or m.group(2).upper() not in _UNITS:
            raise ValueError(f"max_shard_size {size!r} is not a size like '5GB' or '500MB'")
        value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    else:
        raise TypeError(f"max_shard_size must be an int or a string, got {type(size).__name__}")
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


@contextmanager
def atomic_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes `out_dir` when the block succeeds."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True to replace it")
    parent = out.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    except OSError as e:
        raise PermissionError(f"cannot write the checkpoint directory {out}: {e}") from e
    try:
        yield tmp
        old = None
        if out.exists():
            old = parent / f".{out.name}.old-{tmp.name.rsplit('-', 1)[-1]}"
            os.rename(out, old)
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_shards(
    tensors: dict[str, torch.Tensor],
    out_dir: Path,
    max_shard_size: int | str = "5GB",
    metadata: dict[str, str] | None = None,
) -> list[str]:
    """Write tensors as one `model.safetensors` or as shards plus an index; return file names."""
    limit = parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    total = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        total += nbytes
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    meta = {"format": "pt", **(metadata or {})}
    if len(shards) == 1:
        names = [SINGLE_FILE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for fname, shard in zip(names, shards, strict=True):
        save_file({k: v.contiguous() for k, v in shard.items()}, str(out_dir / fname), meta)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": total},
            "weight_map": {k: f for f, s in zip(names, shards, strict=True) for k in s},
        }
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names


def _weight_map(path: Path) -> dict[str, str]:
    index = path / INDEX_FILE
    if index.is_file():
        try:
            data = json.loads(index.read_text())
            weight_map = data["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index} is not a valid safetensors index: {e}") from e
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: weight_map must be a dict")
        return weight_map
    if (path / SINGLE_FILE).is_file():
        return {}
    raise FileNotFoundError(f"{path} has neither {SINGLE_FILE} nor {INDEX_FILE}")


def read_tensors(
    path: str | os.PathLike, check: Callable[[str, str, torch.Tensor], None] | None = None
) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory; `check(file, name, tensor)` may refuse any."""
    path = Path(path)
    weight_map = _weight_map(path)
    files = sorted(set(weight_map.values())) if weight_map else [SINGLE_FILE]
    tensors: dict[str, torch.Tensor] = {}
    for fname in files:
        fpath = path / fname
        if not fpath.is_file():
            raise FileNotFoundError(f"{INDEX_FILE} names {fname}, which is missing from {path}")
        try:
            with safe_open(str(fpath), framework="pt") as f:
                for name in f.keys():
                    if weight_map and weight_map.get(name) != fname:
                        raise ValueError(
                            f"{fpath}: tensor {name!r} is not listed for this file in {INDEX_FILE}"
                        )
                    if name in tensors:
                        raise ValueError(f"{fpath}: tensor {name!r} appears in two files")
                    tensors[name] = f.get_tensor(name)
                    if check is not None:
                        check(fname, name, tensors[name])
        except SafetensorError as e:
            raise ValueError(f"{fpath} is not a valid safetensors file (truncated?): {e}") from e
        except (OSError, RuntimeError) as e:
            raise ValueError(f"cannot read {fpath}: {e}") from e
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise ValueError(f"{INDEX_FILE} lists tensors missing from the files: {missing[:5]}")
    return tensors
