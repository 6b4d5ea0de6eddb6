"""qat4 under torch.distributed on CPU: 2 gloo processes give the losses of one process."""

from __future__ import annotations

import json
import socket

import pytest
import torch
import torch.multiprocessing as mp
from dist_worker import single_process, worker


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_gloo_ranks_match_one_process(mode, tmp_path):
    out = tmp_path / "rank0.json"
    mp.spawn(worker, args=(2, mode, free_port(), str(out)), nprocs=2, join=True)
    result = json.loads(out.read_text())
    losses, quantized = single_process()
    assert len(quantized) == 2
    # each rank compiles and quantizes its blocks' weights (names relative to the compiled module)
    assert len(result["quantized"]) >= 1
    torch.testing.assert_close(result["losses"], losses, rtol=1e-5, atol=1e-7)
