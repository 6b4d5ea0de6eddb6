"""Shared test settings: tolerances (defined once), seeds, hypothesis profiles, isolated caches."""

from __future__ import annotations

import os
import tempfile

# A fresh Inductor/AOT cache per test session: cached artifacts keyed on a graph that holds the
# qatpass op would otherwise survive a change of the op's Python implementation.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="qatpass-inductor-"))
os.environ.setdefault("QATPASS_CACHE_DIR", tempfile.mkdtemp(prefix="qatpass-kernels-"))
# Without a GPU, Triton kernels run in the interpreter on CPU tensors; it must be set before triton
# is first imported. On a CUDA machine the same tests run the compiled kernels.
if os.environ.get("QATPASS_TEST_CUDA") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Property tests: in CI (CI=true) every run draws the same examples and never replays a database,
# so a failure is a code change, not a seed, and no timing (deadline, too_slow) can fail a run on a
# busy machine; locally the default profile explores new examples and replays earlier failures
# from .hypothesis/. HYPOTHESIS_PROFILE=ci reproduces CI locally.
settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    print_blob=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def hypothesis_profile(env: dict[str, str]) -> str:
    """The profile for an environment: HYPOTHESIS_PROFILE if set, "ci" under CI, else "default"."""
    if env.get("HYPOTHESIS_PROFILE"):
        return env["HYPOTHESIS_PROFILE"]
    return "ci" if env.get("CI", "").strip().lower() in ("1", "true", "yes") else "default"


settings.load_profile(hypothesis_profile(dict(os.environ)))

# Tolerances, by what is compared.
EXACT = {"rtol": 0.0, "atol": 0.0}
# same math, different fp32 accumulation order (kernels, compiled vs eager matmuls)
ACCUM = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-2},
    torch.float16: {"rtol": 2e-3, "atol": 2e-3},
}


@pytest.fixture(autouse=True)
def _seed_and_reset():
    torch.manual_seed(0)
    torch._dynamo.reset()
    yield


@pytest.fixture
def no_native_kernel():
    """Turn qatpass's native CPU kernel off: the aten int4 path / fallback are under test."""
    from qatpass.kernels.cpu.native import disabled

    with disabled():
        yield


def _native_unavailable() -> str | None:
    from qatpass.kernels.cpu.native import kernel_unavailable_reason

    return kernel_unavailable_reason()


needs_native = pytest.mark.skipif(
    _native_unavailable() is not None, reason=f"native CPU kernel: {_native_unavailable()}"
)
