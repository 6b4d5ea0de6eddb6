"""Worker for tests/test_distributed.py: a few qat4 training steps under DDP or FSDP2 (gloo, CPU)."""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist
from torch import nn

import qatpass

STEPS = 3


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


def worker(rank: int, world: int, mode: str, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = make_model()
    b = qatpass.backend(compiler="aot_eager")
    if mode == "ddp":
        # compile inside DDP: DDP(torch.compile(model)); torch.compile(DDP(model)) graph-breaks
        from torch.nn.parallel import DistributedDataParallel as DDP

        compiled = DDP(torch.compile(model, backend=b))
    else:
        # FSDP2: compile each block, then shard it (Dynamo does not trace FSDP's hooks)
        from torch.distributed.fsdp import fully_shard

        for i in (0, 2):
            model[i] = torch.compile(model[i], backend=b)
            fully_shard(model[i])
        fully_shard(model)
        compiled = model
    losses = train(model, compiled, world, rank)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"losses": losses, "quantized": sorted(b.quantized_names)}, f)
    dist.destroy_process_group()
