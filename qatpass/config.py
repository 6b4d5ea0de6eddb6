"""QatConfig: the one knob of qatpass (scheme, which parameters, which mode, which compiler)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, replace
from typing import Any

from qatpass.scheme import Int4Scheme, QuantScheme, parse_scale_dtype, parse_scheme

__all__ = ["QatConfig", "DEFAULT_EXCLUDE", "MODES", "COMPILERS"]

# Parameters left in high precision unless `exclude` is overridden: embeddings, the LM head
# (often tied to the embedding) and MoE routers, whose logits are sensitive and whose bytes are few.
DEFAULT_EXCLUDE: tuple[str, ...] = (
    r"(^|\.)lm_head\.",
    r"(^|\.)embed",
    r"(^|\.)(gate|router)\.weight$",
)
MODES = ("train", "inference")
COMPILERS = ("inductor", "aot_eager", "eager")
_SCHEME_KEYS = ("group_size", "symmetric", "qrange", "scale_dtype")


@dataclass(frozen=True)
class QatConfig:
    """What the qat4 backend (and `qatpass.convert`) does.

    include / exclude are regexes searched in a parameter's fully qualified name ("model.layers.0
    .mlp.down_proj.weight"); a parameter is quantized when it feeds a matmul weight operand, matches
    `include` (when given) and matches no `exclude` pattern.
    """

    scheme: QuantScheme = field(default_factory=Int4Scheme)
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    mode: str = "train"
    compiler: str = "inductor"
    inductor_config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            value = tuple(value)
            for pattern in value:
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise ValueError(f"{name} pattern {pattern!r} is not a valid regex: {e}") from e
            object.__setattr__(self, name, value)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.compiler not in COMPILERS:
            raise ValueError(f"compiler must be one of {COMPILERS}, got {self.compiler!r}")
        if isinstance(self.scheme, (str, dict)):
            object.__setattr__(self, "scheme", parse_scheme(self.scheme))
        if not isinstance(self.scheme, QuantScheme):
            raise TypeError(
                "scheme must be a QuantScheme (Int4Scheme, Fp4Scheme) or one of 'int4', 'nvfp4', "
                f"'mxfp4', got {type(self.scheme).__name__}"
            )

    @classmethod
    def from_options(cls, options: dict[str, Any] | None = None, **kwargs: Any) -> QatConfig:
        """Build from a flat dict, as `torch.compile(..., options={...})` passes it.

        `scheme` is a scheme object or a name ("int4", "nvfp4", "mxfp4"); INT4 fields (group_size,
        symmetric, qrange, scale_dtype) may be given flat; unknown keys raise, so a typo never
        silently falls back to a default.
        """
        opts = {**(options or {}), **kwargs}
        known = {f.name for f in fields(cls)} | set(_SCHEME_KEYS)
        unknown = sorted(set(opts) - known)
        if unknown:
            raise ValueError(f"unknown qat4 option(s) {unknown}; known: {sorted(known)}")
        scheme_kwargs = {k: opts.pop(k) for k in _SCHEME_KEYS if k in opts}
        if "scale_dtype" in scheme_kwargs:
            scheme_kwargs["scale_dtype"] = parse_scale_dtype(scheme_kwargs["scale_dtype"])
        if scheme_kwargs:
            if "scheme" in opts:
                raise ValueError("give either `scheme` or its fields, not both")
            opts["scheme"] = Int4Scheme(**scheme_kwargs)
        return cls(**opts)

    def with_options(self, **kwargs: Any) -> QatConfig:
        return replace(self, **kwargs)

    def selects(self, fqn: str) -> str | None:
        """Why the parameter named fqn is left alone by the filters, or None when it is selected."""
        if self.include and not any(re.search(p, fqn) for p in self.include):
            return f"not matched by include {list(self.include)}"
        for pattern in self.exclude:
            if re.search(pattern, fqn):
                return f"excluded by filter {pattern!r}"
        return None
