"""qat4 under torch.distributed on CPU: 2 gloo processes give the losses of one process.

The ranks run in spawned processes with a deadline: a rank that hangs (a stuck collective, a
deadlock in teardown) is killed and the test fails with what each rank reported, never holds CI.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import socket
import time
import warnings
from pathlib import Path

import pytest
import torch
from dist_worker import result_path, single_process, worker

WORLD = 2
DEADLINE_S = 300.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(mode: str, out_dir: str, **worker_kwargs) -> list[dict]:
    """Run the worker on WORLD spawned ranks; each rank's report, or a failure naming the rank."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [
        ctx.Process(
            target=worker, args=(r, WORLD, mode, port, out_dir), kwargs=worker_kwargs, daemon=True
        )
        for r in range(WORLD)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + DEADLINE_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in hung:
        procs[r].kill()
        procs[r].join(10)
    reports = []
    for r in range(WORLD):
        path = Path(result_path(out_dir, r))
        reports.append(json.loads(path.read_text()) if path.exists() else {})
    problems = []
    for r, (p, rep) in enumerate(zip(procs, reports, strict=True)):
        if "error" in rep:
            problems.append(f"rank {r} failed:\n{rep['error']}")
        elif not rep:
            state = "was killed at the deadline" if r in hung else f"exited with {p.exitcode}"
            problems.append(f"rank {r} reported nothing and {state}")
        elif r in hung or p.exitcode != 0:
            # results are in; only torch's gloo teardown did not finish (its stacks are on stderr)
            warnings.warn(
                f"rank {r}: process group teardown did not finish (exit code {p.exitcode})",
                stacklevel=2,
            )
    if problems:
        pytest.fail("\n".join(problems))
    return reports


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_gloo_ranks_match_one_process(mode, tmp_path):
    reports = run_ranks(mode, str(tmp_path))
    losses, quantized = single_process()
    assert len(quantized) == 2
    for result in reports:
        # each rank compiles and quantizes its blocks' weights (names relative to the compiled module)
        assert len(result["quantized"]) >= 1
        torch.testing.assert_close(result["losses"], losses, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_a_failing_rank_is_reported_not_hung(tmp_path):
    # an unknown mode raises on both ranks before any collective: both report, nothing hangs
    with pytest.raises(pytest.fail.Exception, match="rank 0 failed"):
        run_ranks("no-such-mode", str(tmp_path))


@pytest.mark.slow
def test_a_teardown_that_hangs_is_cut_short(tmp_path):
    # a destroy_process_group that never returns (as ~ProcessGroupGloo() once deadlocked): the
    # faulthandler watchdog ends the rank; its results were reported before, so only a warning
    with pytest.warns(UserWarning, match="teardown did not finish"):
        reports = run_ranks("ddp", str(tmp_path), teardown_timeout_s=2.0, hang_teardown=True)
    assert all(len(r["losses"]) == 3 for r in reports)
