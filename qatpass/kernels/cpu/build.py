"""The native kernel's build cache: compile once per machine, verify what is loaded.

    lib = open_library(source, flags, compiler)    # ctypes.CDLL; OSError/RuntimeError say why
    lib, why = load_kernel(source, flags, stem, "W4A16")  # or (None, why), the machine's checks

The library lives in `$QATPASS_CACHE_DIR` (default `$XDG_CACHE_HOME/qatpass`, else
`~/.cache/qatpass`) as `<stem>-<key>.so` beside `<stem>-<key>.so.sha256`, the sha256 of its bytes
recorded at build time; the key hashes the source, the flags and the compiler's version. Loading
trusts nothing it did not write:

- the directory must be ours (owner = this uid) and writable by nobody else, or sticky (as
  /tmp is); otherwise a private temporary directory is used for this process (logged);
- the .so and its .sha256 must be regular files (no symlinks) owned by us, not writable by group
  or others, and the bytes must hash to the record. A damaged library (truncated, empty,
  garbage, a stale record) is rebuilt (logged), a planted one is never opened;
- the verified bytes are what is loaded: copied into a memfd and opened from there, so a file
  truncated or replaced between the check and dlopen cannot crash (SIGBUS) or swap the code;
- a build writes to a temporary file named with its pid, fsyncs it and its record, renames
  both into place (atomic: concurrent builds write the same bytes) and fsyncs the directory.
  Temporary files of builds that were killed (their pid is gone, or older than an hour) are
  removed on the next build.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["cache_dir", "dir_problem", "library_path", "open_library", "verified_bytes"]

log = logging.getLogger(__name__)

_TMP_SUFFIX = ".tmp"
_STALE_S = 3600.0


def cache_dir() -> Path:
    """Where the library is cached (not created here)."""
    explicit = os.environ.get("QATPASS_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qatpass"


def _mode_problem(what: str, st: os.stat_result, sticky_ok: bool) -> str | None:
    if st.st_uid != os.getuid():
        return f"{what} is owned by uid {st.st_uid}, not this user ({os.getuid()})"
    if st.st_mode & 0o022 and not (sticky_ok and st.st_mode & stat.S_ISVTX):
        return f"{what} is writable by group or others (mode {stat.filemode(st.st_mode)})"
    return None


def dir_problem(directory: Path) -> str | None:
    """Why code must not be loaded from `directory` (None when it is ours and safe)."""
    try:
        st = os.stat(directory)
    except OSError as e:
        return f"cannot stat {directory}: {e}"
    if not stat.S_ISDIR(st.st_mode):
        return f"{directory} is not a directory"
    return _mode_problem(str(directory), st, sticky_ok=True)


def _read_own_file(path: Path) -> bytes | None:
    """The bytes of a regular file we own and only we can write, else None (logged)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:  # a symlink (ELOOP) or unreadable
        log.warning("qatpass: not loading %s: %s", path, e)
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        problem = None if stat.S_ISREG(st.st_mode) else "not a regular file"
        problem = problem or _mode_problem(str(path), st, sticky_ok=False)
        if problem:
            log.warning("qatpass: not loading %s: %s", path, problem)
            return None
        return f.read()


def verified_bytes(path: Path) -> bytes | None:
    """The library's bytes when they match the sha256 recorded at build time, else None."""
    data = _read_own_file(path)
    record = _read_own_file(_record(path))
    if data is None or record is None:
        return None
    if hashlib.sha256(data).hexdigest() != record.decode("ascii", "replace").strip():
        log.warning("qatpass: %s does not match its recorded sha256 (damaged)", path)
        return None
    return data


def _record(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def library_path(directory: Path, stem: str, source: Path, flags, compiler: str) -> Path:
    """`<stem>-<key>.so` in directory, key = hash of the source, flags and compiler version."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256("\0".join([source.read_text(), *flags, version]).encode())
    return directory / f"{stem}-{digest.hexdigest()[:16]}.so"


def _tmp_path(out: Path, tag: str) -> Path:
    return out.with_name(f".{out.name}{tag}.{os.getpid()}.{os.urandom(4).hex()}{_TMP_SUFFIX}")


def _write_synced(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def compile_library(compiler: str, source: Path, flags, out: Path) -> None:
    """Build into `out` with its sha256 record (atomic, fsynced); RuntimeError with the
    compiler's message on failure, no file left behind."""
    out.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp, tmp_record = _tmp_path(out, ""), _tmp_path(out, ".sha256")
    try:
        cmd = [compiler, *flags, str(source), "-o", str(tmp)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-600:]}")
        data = tmp.read_bytes()
        tmp.unlink()
        _write_synced(tmp, data)  # ours, 0600, fsynced
        _write_synced(tmp_record, hashlib.sha256(data).hexdigest().encode() + b"\n")
        os.replace(tmp, out)
        os.replace(tmp_record, _record(out))
        _fsync_dir(out.parent)
    finally:
        tmp.unlink(missing_ok=True)
        tmp_record.unlink(missing_ok=True)
    log.info("qatpass: built %s into %s", source.name, out)


def clean_stale_temps(directory: Path) -> list[Path]:
    """Remove our temporary files of builds whose process is gone (or older than an hour)."""
    removed = []
    for path in directory.glob(f".*{_TMP_SUFFIX}"):
        try:
            st = path.lstat()
            pid = int(path.name.rsplit(".", 3)[-3])
        except (OSError, ValueError, IndexError):
            continue
        if st.st_uid != os.getuid():
            continue
        alive = True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            alive = False
        except PermissionError:
            pass
        if not alive or time.time() - st.st_mtime > _STALE_S:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


# memfds of loaded libraries, kept open: dlopen matches an already loaded library by its path
# string, so a closed fd's number (reused by the next memfd) would hand the next library's
# "/proc/self/fd/N" the first one's handle
_LOADED_FDS: list[int] = []


def _dlopen_bytes(data: bytes, name: str) -> ctypes.CDLL:
    """Open a shared library from bytes already verified (a memfd: nobody else can change it)."""
    if not hasattr(os, "memfd_create"):  # pragma: no cover - Linux has it
        raise OSError("os.memfd_create is unavailable")
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        lib = ctypes.CDLL(f"/proc/self/fd/{fd}")
    except BaseException:
        os.close(fd)
        raise
    _LOADED_FDS.append(fd)
    return lib


def open_library(source: Path, flags, compiler: str, stem: str = "w4a16_cpu") -> ctypes.CDLL:
    """Build if needed, verify, load (see the module docstring). OSError/RuntimeError on failure."""
    directory = cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        log.warning("qatpass: cannot create the kernel cache %s: %s", directory, e)
    problem = dir_problem(directory)
    if problem:
        directory = Path(tempfile.mkdtemp(prefix="qatpass-kernel-"))
        log.warning("qatpass: kernel cache refused (%s); building into %s", problem, directory)
    path = library_path(directory, stem, source, flags, compiler)
    data = verified_bytes(path)
    if data is None:
        if path.exists() or path.is_symlink():
            log.warning("qatpass: rebuilding the damaged or foreign kernel %s", path)
        clean_stale_temps(directory)
        compile_library(compiler, source, flags, path)
        data = verified_bytes(path)
        if data is None:
            raise RuntimeError(f"the kernel just built into {path} does not verify")
    return _dlopen_bytes(data, path.name)


def load_kernel(source: Path, flags, stem: str, what: str) -> tuple[ctypes.CDLL | None, str | None]:
    """(library, None) or (None, why it is unavailable here): QATPASS_CPU_KERNEL=0, not x86-64,
    no C compiler, or a failed build (logged, naming `what`). The CPU feature check is the
    caller's: each library exports its own."""
    if os.environ.get("QATPASS_CPU_KERNEL", "1") == "0":
        return None, "disabled by QATPASS_CPU_KERNEL=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None, f"the kernel is x86-64 only (this CPU: {platform.machine()})"
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return None, "no C compiler found ($CC or cc)"
    try:
        return open_library(source, flags, compiler, stem=stem), None
    except (OSError, RuntimeError) as e:
        log.warning("qatpass: CPU %s kernel unavailable: %s", what, e)
        return None, f"build failed: {e}"
