"""Worker for tests/test_distributed.py: a few qat4 training steps under DDP or FSDP2 (gloo, CPU).

Each rank reports through its own JSON file (`{"losses": ..., "quantized": ...}` or
`{"error": traceback}`) once a barrier says every rank is done with its collectives, then tears the
group down explicitly and ends with `os._exit`, so the interpreter's finalizers never run a
`~ProcessGroupGloo()` (seen to deadlock: its thread waits for the GIL the exiting main thread
holds). Should the explicit teardown itself hang, faulthandler's C watchdog (it needs no GIL)
dumps the stacks and exits 1: the parent sees results reported and a teardown that did not finish.
"""

from __future__ import annotations

import datetime
import faulthandler
import json
import os
import time
import traceback

import torch
import torch.distributed as dist
from torch import nn

import qatpass

STEPS = 3
# every collective (and the rendezvous) fails after this instead of waiting forever on a dead peer
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=120)
TEARDOWN_TIMEOUT_S = 60.0


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))


def batches(world: int, rank: int):
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x = torch.randn(8, 64, generator=g)
        yield x.chunk(world)[rank]


def train(model: nn.Module, compiled: nn.Module, world: int, rank: int) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for x in batches(world, rank):
        loss = compiled(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        t = loss.detach().clone()
        if world > 1:
            dist.all_reduce(t)
        losses.append(t.item() / world)
    return losses


def single_process() -> tuple[list[float], list[str]]:
    model = make_model()
    b = qatpass.backend(compiler="aot_eager")
    return train(model, torch.compile(model, backend=b), 1, 0), b.quantized_names


def _run(rank: int, world: int, mode: str) -> dict:
    model = make_model()
    b = qatpass.backend(compiler="aot_eager")
    if mode == "ddp":
        # compile inside DDP: DDP(torch.compile(model)); torch.compile(DDP(model)) graph-breaks
        from torch.nn.parallel import DistributedDataParallel as DDP

        compiled = DDP(torch.compile(model, backend=b))
    elif mode == "fsdp2":
        # FSDP2: compile each block, then shard it (Dynamo does not trace FSDP's hooks)
        from torch.distributed.fsdp import fully_shard

        for i in (0, 2):
            model[i] = torch.compile(model[i], backend=b)
            fully_shard(model[i])
        fully_shard(model)
        compiled = model
    else:
        raise ValueError(f"mode must be 'ddp' or 'fsdp2', got {mode!r}")
    losses = train(model, compiled, world, rank)
    return {"losses": losses, "quantized": sorted(b.quantized_names)}


def result_path(out_dir: str, rank: int) -> str:
    return os.path.join(out_dir, f"rank{rank}.json")


def _report(out_dir: str, rank: int, result: dict) -> None:
    tmp = result_path(out_dir, rank) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, result_path(out_dir, rank))


def worker(
    rank: int,
    world: int,
    mode: str,
    port: int,
    out_dir: str,
    teardown_timeout_s: float = TEARDOWN_TIMEOUT_S,
    hang_teardown: bool = False,
) -> None:
    """One rank: train, report to `out_dir/rank<r>.json`, tear down, `os._exit` (0 ok, 1 error).

    `hang_teardown` stands in for the gloo destructor deadlock (tests the watchdog).
    """
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)
        result = _run(rank, world, mode)
        dist.barrier()  # every rank is done with its collectives before any group goes away
        _report(out_dir, rank, result)
    except BaseException:  # noqa: B036  (reported to the parent, then a hard exit either way)
        try:
            _report(out_dir, rank, {"error": traceback.format_exc()})
        finally:
            os._exit(1)
    code = 0
    try:
        faulthandler.dump_traceback_later(teardown_timeout_s, exit=True)
        if hang_teardown:
            time.sleep(3600)
        dist.destroy_process_group()
        faulthandler.cancel_dump_traceback_later()
    except BaseException:  # noqa: B036
        traceback.print_exc()
        code = 1
    finally:
        os._exit(code)
