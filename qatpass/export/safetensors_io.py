"""Write and read (sharded) safetensors checkpoints safely: all or nothing, clear errors.

A checkpoint directory is written into a temporary sibling and renamed into place, so a failure
never leaves a half-written directory; an existing non-empty directory is only replaced with
`overwrite=True`. Reading wraps every safetensors error with the file name and checks the index.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from glob import escape as glob_escape
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

__all__ = [
    "SINGLE_FILE",
    "INDEX_FILE",
    "parse_size",
    "atomic_dir",
    "recover_interrupted",
    "write_shards",
    "read_tensors",
    "check_member_name",
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


def _tmp_name(out: Path, tag: str) -> str:
    return f".{out.name}.tmp-{tag}"


def _backup_name(out: Path, tag: str) -> str:
    return f".{out.name}.old-{tag}"


def _locked(path: Path) -> int | None:
    """An fd holding an exclusive flock on directory `path`, or None when another process holds it.

    Every save holds the lock on its temporary directory until it is done; the kernel drops it when
    the process dies (kill -9 included), so an unlocked temporary directory is a dead save's.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def recover_interrupted(out_dir: str | os.PathLike) -> list[Path]:
    """Undo what killed saves of `out_dir` left next to it; return the paths removed or restored.

    A save writes `.<name>.tmp-<tag>/`, then (overwrite) renames `<name>` to `.<name>.old-<tag>`,
    renames the temporary directory to `<name>` and deletes the backup. Killed before the second
    rename, `<name>` is missing while both siblings exist: the backup is renamed back (that save
    never returned, so the old checkpoint is the current one). Every other leftover of a dead save
    (its unfinished temporary directory, a backup that was being deleted) is removed. Directories
    of a save still running (its lock is held) are left alone.
    """
    out = Path(out_dir)
    parent = out.absolute().parent
    if not parent.is_dir():
        return []
    touched: list[Path] = []
    prefix = f".{out.name}.tmp-"
    for tmp in sorted(parent.glob(f"{glob_escape(prefix)}*")):
        tag = tmp.name[len(prefix) :]
        if not tmp.is_dir() or tmp.is_symlink():
            continue
        try:
            fd = _locked(tmp)
        except OSError:
            continue  # renamed into place meanwhile, or not ours to open
        if fd is None:
            continue  # a save in progress
        try:
            backup = parent / _backup_name(out, tag)
            if backup.is_dir() and not out.exists():
                os.rename(backup, out)
                touched.append(out)
            shutil.rmtree(tmp)
            touched.append(tmp)
        except OSError:
            continue  # best effort: a leftover we cannot remove never blocks a save
        finally:
            os.close(fd)
    for backup in sorted(parent.glob(f"{glob_escape(f'.{out.name}.old-')}*")):
        tag = backup.name[len(f".{out.name}.old-") :]
        if (parent / _tmp_name(out, tag)).exists() or not backup.is_dir() or backup.is_symlink():
            continue  # its save is running (or was just handled above)
        if not out.exists():
            continue  # never delete the only copy; a save of out_dir restores it (see above)
        shutil.rmtree(backup, ignore_errors=True)  # its own save may be deleting it too
        touched.append(backup)
    return touched


@contextmanager
def atomic_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes `out_dir` when the block succeeds.

    Safe under kill -9 at any point: `out_dir` is either the old checkpoint or the new one, except
    between the two renames of an overwrite, which the next save of `out_dir` (or
    `recover_interrupted`) rolls back; leftovers of killed saves are cleaned up on entry.
    """
    out = Path(out_dir)
    parent = out.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        recover_interrupted(out)
    except OSError as e:
        raise PermissionError(f"cannot write the checkpoint directory {out}: {e}") from e
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True to replace it")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=_tmp_name(out, ""), dir=parent))
        fd = _locked(tmp)
    except OSError as e:
        raise PermissionError(f"cannot write the checkpoint directory {out}: {e}") from e
    assert fd is not None  # a directory just made by this process
    backup = parent / _backup_name(out, tmp.name[len(_tmp_name(out, "")) :])
    try:
        yield tmp
        _fsync_tree(tmp)
        if out.exists():
            os.rename(out, backup)
        os.rename(tmp, out)
        _fsync_dir(parent)
        shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        if backup.exists() and not out.exists():
            os.rename(backup, out)  # failed (or interrupted) between the renames: put it back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file of `root` and the directory itself, so a rename publishes whole files."""
    for f in root.iterdir():
        if f.is_file() and not f.is_symlink():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(root)


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


def check_member_name(fname: object, where: Path) -> str:
    """`fname` if it names a file inside the checkpoint directory, else a ValueError naming `where`.

    Checked on the name, not on where it resolves: a file that is a symlink to elsewhere (the
    Hugging Face hub cache links snapshot files to its blobs) still loads.
    """
    if not isinstance(fname, str) or not fname:
        raise ValueError(f"{where}: shard file names must be non-empty strings, got {fname!r}")
    parts = PurePosixPath(fname).parts
    if (
        "\\" in fname
        or "\0" in fname
        or PurePosixPath(fname).is_absolute()
        or PureWindowsPath(fname).drive
        or any(part in ("..", ".") for part in parts)
    ):
        raise ValueError(
            f"{where} names {fname!r}, which is not a file inside the checkpoint directory"
        )
    return fname


def _weight_map(path: Path) -> dict[str, str]:
    index = path / INDEX_FILE
    if index.is_file():
        try:
            data = json.loads(index.read_bytes().decode("utf-8"))
            weight_map = data["weight_map"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index} is not a valid safetensors index: {e}") from e
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: weight_map must be a dict")
        for fname in weight_map.values():
            check_member_name(fname, index)
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
