"""The `qat4` torch.compile backend: rewrite each Dynamo graph, then hand it to a compiler.

    torch.compile(model, backend="qat4")                                  # entry point, defaults
    torch.compile(model, backend="qat4", options={"group_size": 128})     # options -> QatConfig
    torch.compile(model, backend=qatpass.backend(compiler="aot_eager"))   # an object to ask later

Each graph's weights are decided by the plan (passes/plan.py); the backend object accumulates
the plan over every graph it compiled (`QatBackend.plan`), which `qatpass.convert(model,
plan=b.plan)` and the exporters then serve. train mode inserts fake quant on the planned weights
(passes/insert_fake_quant.py); inference mode lowers their matmuls to the packed W4A16 op
(passes/lower_w4a16.py). Then Inductor (default, forward and backward through AOTAutograd),
aot_eager or eager compiles the graph. This module must not call `register_backend("qat4")`:
the entry point registers it.

A default run whose plan skips matmul weights for a reason other than the policy (a shape not
divisible by the group size, say) logs them at WARNING with a count. Should Dynamo ever give up
on a frame (its recompile limit) and run it eagerly, that frame's weights would run unquantized:
qatpass then logs an ERROR on the `qatpass` logger naming the frame (it does not raise: the
model still runs, in high precision, as Dynamo decided).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx

from qatpass.config import DEFAULT_EXCLUDE, QatConfig
from qatpass.passes.insert_fake_quant import insert_fake_quant
from qatpass.passes.plan import QuantPlan, is_experts_module, plan_graph
from qatpass.passes.weight_uses import root_modules
from qatpass.report import GraphSummary, next_graph_id, record

__all__ = ["QatBackend", "backend", "qat4"]

DEBUG_DIR_ENV = "QATPASS_DEBUG_DIR"
log = logging.getLogger("qatpass")


def _compile(gm: fx.GraphModule, example_inputs: Sequence[Any], config: QatConfig) -> Callable:
    if config.compiler == "eager":
        return gm.forward
    if config.compiler == "aot_eager":
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend("aot_eager")(gm, example_inputs)
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import compile_fx

    with inductor_config.patch(config.inductor_config):
        return compile_fx(gm, example_inputs)


def _warn_uncapturable_experts(roots: Sequence[torch.nn.Module], warned: set[int]) -> None:
    """Warn once per experts module that runs transformers' "eager" experts loop.

    That loop iterates over a data-dependent list of experts and breaks the graph inside a for
    loop, so Dynamo runs the whole experts forward uncompiled: the backend never sees those
    weights and cannot fake-quantize them. "grouped_mm" (the default) and "batched_mm" compile.
    """
    for root in roots:
        for name, module in root.named_modules():
            cfg = getattr(module, "config", None)
            impl = getattr(cfg, "_experts_implementation", None)
            if impl == "eager" and is_experts_module(module) and id(module) not in warned:
                warned.add(id(module))
                log.warning(
                    "qat4: %s uses transformers' 'eager' experts implementation, which torch.compile "
                    "runs uncompiled (graph break in its data-dependent expert loop), so its expert "
                    "weights are NOT fake-quantized; set config._experts_implementation to "
                    "'grouped_mm' (default) or 'batched_mm'",
                    name or type(module).__name__,
                )


class _EagerFallbackWatch(logging.Filter):
    """Turns Dynamo's "hit config.recompile_limit" warning into a qatpass ERROR.

    Past that limit Dynamo runs the frame eagerly, so the weights it reads are not quantized.
    Installed once, by the first qat4 backend call (never at import time).
    """

    installed = False

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if msg.startswith("torch._dynamo hit config.") and record.args:
            args = record.args if isinstance(record.args, tuple) else (record.args,)
            frame = args[2] if len(args) > 2 else "?"
            log.error(
                "qat4: Dynamo hit its %s and now runs %s eagerly: if that frame was compiled "
                "with backend='qat4', its weights are NOT quantized from here on (raise the "
                "limit, or mark the changing dims dynamic with torch._dynamo.mark_dynamic)",
                args[0],
                frame,
            )
        return True

    @classmethod
    def install(cls) -> None:
        if not cls.installed:
            logging.getLogger("torch._dynamo.convert_frame").addFilter(cls())
            cls.installed = True


class QatBackend:
    """A configured qat4 backend; keeps the plan and the summary of every graph it rewrote."""

    def __init__(self, config: QatConfig | None = None) -> None:
        self.config = config or QatConfig()
        self.summaries: list[GraphSummary] = []
        self._plan = QuantPlan(scheme=self.config.scheme)
        self._warned: set[int] = set()
        self._warned_skips: set[str] = set()

    @property
    def plan(self) -> QuantPlan:
        """The plan of every graph this backend compiled so far (what convert/export serve)."""
        return self._plan

    def transform(
        self, gm: fx.GraphModule, example_inputs: Sequence[Any]
    ) -> tuple[fx.GraphModule, GraphSummary]:
        """Rewrite gm for this config without compiling it (used by the backend and the diff tool)."""
        targets, plan = plan_graph(gm, example_inputs, self.config)
        summary = GraphSummary(graph_id=next_graph_id(), mode=self.config.mode, plan=plan)
        self._plan.merge(plan)
        self._warn_skips(plan)
        if self.config.mode == "train":
            insert_fake_quant(gm, targets, self.config)
            return gm, summary
        from qatpass.passes.lower_w4a16 import lower_graph

        return lower_graph(gm, example_inputs, targets, self.config), summary

    def _warn_skips(self, plan: QuantPlan) -> None:
        """WARNING for matmul weights a default run leaves alone for a non-policy reason."""
        if self.config.include or self.config.exclude != DEFAULT_EXCLUDE:
            return
        new = [s for s in plan.not_by_policy() if s.fqn not in self._warned_skips]
        if new:
            self._warned_skips.update(s.fqn for s in new)
            log.warning(
                "qat4: %d matmul weight(s) left in high precision for a reason other than the "
                "default policy: %s",
                len(new),
                "; ".join(f"{s.fqn}: {s.reason}" for s in new[:8])
                + (f"; ... ({len(new) - 8} more)" if len(new) > 8 else ""),
            )

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        _EagerFallbackWatch.install()
        _warn_uncapturable_experts(root_modules(), self._warned)
        debug_dir = os.environ.get(DEBUG_DIR_ENV)
        before = gm.print_readable(print_output=False) if debug_dir else None
        gm, summary = self.transform(gm, example_inputs)
        self.summaries.append(summary)
        record(summary)
        if debug_dir:
            from qatpass.debug_dump import dump_graph

            dump_graph(debug_dir, summary, before, gm.print_readable(print_output=False))
        return _compile(gm, example_inputs, self.config)

    @property
    def quantized_names(self) -> list[str]:
        return self._plan.quantized_names


def backend(config: QatConfig | None = None, **options: Any) -> QatBackend:
    """A qat4 backend object: `torch.compile(model, backend=qatpass.backend(group_size=128))`."""
    if config is not None and options:
        raise ValueError("give either a QatConfig or options, not both")
    return QatBackend(config or QatConfig.from_options(options))


def qat4(
    gm: fx.GraphModule, example_inputs: Sequence[Any], options: dict[str, Any] | None = None
) -> Callable:
    """The function behind `backend="qat4"`; `options=` of torch.compile arrive here."""
    return QatBackend(QatConfig.from_options(options))(gm, example_inputs)
