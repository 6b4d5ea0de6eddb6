"""Run a model once under torch.compile with a recording backend (planning, the diff tool).

`call_model(model, example_inputs)` calls a model on a tensor, a tuple of positional arguments or
a dict of keyword arguments. `run_with_backend(model, example_inputs, backend)` compiles and runs
it once without gradients, with Dynamo reset before and after (cached graphs of earlier compiles
are neither reused nor kept), and returns the graph breaks Dynamo counted. A ValueError or
TypeError the backend raises (e.g. NaN weights) comes out as itself, not wrapped by Dynamo.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch._dynamo.exc import BackendCompilerFailed

__all__ = ["call_model", "run_with_backend"]


def call_model(model: nn.Module, example_inputs: Any) -> Any:
    """model(*inputs) for a tuple/list, model(**inputs) for a dict, model(inputs) for a tensor."""
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return model(example_inputs)
    raise TypeError(
        "example_inputs must be a tensor, a tuple/list of positional arguments or a dict of "
        f"keyword arguments, got {type(example_inputs).__name__}"
    )


def _break_counts() -> Counter:
    from torch._dynamo.utils import counters

    return Counter(counters["graph_break"])


def run_with_backend(model: nn.Module, example_inputs: Any, backend: Callable) -> Counter:
    """Compile model with `backend`, call it once on example_inputs; the graph breaks seen."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    torch._dynamo.reset()
    start = _break_counts()
    try:
        with torch.no_grad():
            call_model(torch.compile(model, backend=backend), example_inputs)
        return _break_counts() - start
    except BackendCompilerFailed as e:
        inner = getattr(e, "inner_exception", None)
        if isinstance(inner, (ValueError, TypeError)):
            raise inner from e
        raise
    finally:
        torch._dynamo.reset()
