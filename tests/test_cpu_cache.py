"""The native kernel's build cache (kernels/cpu/build.py): verify what is loaded, rebuild what is
damaged, refuse what is not ours, clean up after killed builds. A tiny C source keeps it fast."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

from qatpass.kernels.cpu import build

FLAGS = ("-shared", "-fPIC", "-O0")
needs_cc = pytest.mark.skipif(
    subprocess.run(["sh", "-c", "command -v cc"], capture_output=True).returncode != 0,
    reason="no C compiler (cc)",
)
pytestmark = needs_cc


@pytest.fixture
def env(tmp_path, monkeypatch):
    """(cache dir, source): QATPASS_CACHE_DIR points at a fresh private dir."""
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    monkeypatch.setenv("QATPASS_CACHE_DIR", str(cache))
    source = tmp_path / "probe.c"
    source.write_text("int qp_probe(void) { return 42; }\n")
    return cache, source


def _path(cache, source):
    return build.library_path(cache, "w4a16_cpu", source, FLAGS, "cc")


def _open(source):
    return build.open_library(source, FLAGS, "cc")


def test_builds_records_and_loads(env):
    cache, source = env
    assert _open(source).qp_probe() == 42
    so = _path(cache, source)
    record = so.with_name(so.name + ".sha256").read_text().strip()
    assert record == hashlib.sha256(so.read_bytes()).hexdigest()
    assert so.stat().st_mode & 0o077 == 0  # private
    assert not list(cache.glob(".*.tmp"))


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "symlink"])
def test_a_damaged_library_is_rebuilt_not_loaded(env, damage, tmp_path):
    cache, source = env
    _open(source)
    so = _path(cache, source)
    good = so.read_bytes()
    if damage == "truncated":
        so.write_bytes(good[: len(good) // 3])
    elif damage == "empty":
        so.write_bytes(b"")
    elif damage == "garbage":
        so.write_bytes(os.urandom(len(good)))
    else:
        other = tmp_path / "elsewhere.so"
        other.write_bytes(good)
        so.unlink()
        so.symlink_to(other)
    # in this very process: a truncated mapping would SIGBUS here if it were dlopened
    assert _open(source).qp_probe() == 42
    assert not so.is_symlink() and build.verified_bytes(so) is not None


def _planted(tmp_path, marker):
    """A library whose constructor writes `marker`: proof that it was loaded."""
    src = tmp_path / "evil.c"
    src.write_text(
        "#include <stdio.h>\n"
        f'__attribute__((constructor)) static void evil(void) {{ FILE* f = fopen("{marker}", "w");'
        " if (f) fclose(f); }\nint qp_probe(void) { return 666; }\n"
    )
    out = tmp_path / "evil.so"
    subprocess.run(["cc", *FLAGS, str(src), "-o", str(out)], check=True)
    return out.read_bytes()


def test_a_world_writable_cache_dir_is_refused(env, tmp_path):
    cache, source = env
    marker = tmp_path / "constructor-ran"
    data = _planted(tmp_path, marker)
    os.chmod(cache, 0o777)  # no sticky bit: anyone could have written there
    so = _path(cache, source)
    so.write_bytes(data)
    so.with_name(so.name + ".sha256").write_text(hashlib.sha256(data).hexdigest())
    assert build.dir_problem(cache) is not None
    assert _open(source).qp_probe() == 42  # built privately instead
    assert not marker.exists()


def test_a_sticky_world_writable_dir_we_own_is_accepted(env):
    cache, source = env
    os.chmod(cache, 0o1777)
    assert build.dir_problem(cache) is None
    assert _open(source).qp_probe() == 42


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to create another user's files")
def test_a_library_owned_by_someone_else_is_not_loaded(env, tmp_path):
    cache, source = env
    marker = tmp_path / "constructor-ran"
    data = _planted(tmp_path, marker)
    so = _path(cache, source)
    so.write_bytes(data)
    record = so.with_name(so.name + ".sha256")
    record.write_text(hashlib.sha256(data).hexdigest())
    os.chown(so, 65534, 65534)
    os.chown(record, 65534, 65534)
    assert _open(source).qp_probe() == 42
    assert not marker.exists()
    assert so.stat().st_uid == os.getuid()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to create another user's dir")
def test_a_cache_dir_owned_by_someone_else_is_refused(env):
    cache, source = env
    os.chown(cache, 65534, 65534)
    assert "owned by uid 65534" in build.dir_problem(cache)
    assert _open(source).qp_probe() == 42
    assert not list(cache.iterdir())


def test_stale_temp_files_of_a_killed_build_are_removed(env):
    cache, source = env
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    so = _path(cache, source)
    stale = so.with_name(f".{so.name}.{dead.pid}.deadbeef.tmp")
    stale.write_bytes(b"half a library")
    live = so.with_name(f".{so.name}.{os.getpid()}.cafecafe.tmp")  # a build in progress
    live.write_bytes(b"being written")
    assert _open(source).qp_probe() == 42
    assert not stale.exists()
    assert live.exists()


def test_an_old_temp_file_is_removed_even_if_its_pid_is_reused(env):
    cache, source = env
    so = _path(cache, source)
    old = so.with_name(f".{so.name}.{os.getpid()}.0ld0ld00.tmp")
    old.write_bytes(b"x")
    os.utime(old, (0, 0))
    assert build.clean_stale_temps(cache) == [old]


def test_a_failing_compiler_leaves_nothing(env, tmp_path):
    cache, source = env
    with pytest.raises(RuntimeError, match="failed"):
        build.compile_library("false", source, FLAGS, cache / "lib.so")
    assert not list(cache.iterdir())
