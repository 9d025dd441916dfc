"""Float comparisons between two computation paths, relative to the scale of the values.

Two paths that are equal in exact arithmetic (chunked vs full, batched vs alone, converted vs
reference, cached vs live, bf16 vs fp32) differ in float rounding, and by how much depends on the
CPU's kernels: SIMD width (AVX2 vs AVX-512), thread count, BLAS (MKL vs OpenBLAS), summation order.
That rounding is proportional to the magnitude of the values being computed, so a bound must be
too: ``max |actual - expected| <= rtol * scale``, with scale = max |expected| unless the caller
names the magnitude the error really scales with (a mean's inputs, a loss's logits).

rtol is then a multiple of the format's unit roundoff, sized by the depth of the computation:

    FP32_EPS ~ 1.2e-7   one correctly rounded float32 operation
    FP32_SUM = 1e-6     (~8 eps) one sum in another order (a mean, a dot product, an all-reduce):
                        cascade / SIMD-lane summation errs by ~log2(n) eps of the terms' scale
    FP32_OPS = 1e-5     (~80 eps) a few ops, or one block, over other shapes or kernels
    FP32_NET = 1e-4     (~800 eps) a multi-layer network (transformer, CNN) over other shapes or
                        kernels, where LayerNorm, softmax and residual stacks amplify rounding
                        layer by layer (Whisper tiny.en, 4 layers: up to 1.8e-5 seen on AVX-512)

A bug (a wrong weight, a mask that leaks, a dropped bias) moves values by O(1) relative, far
above either bound. Exact equality (torch.equal) is right only where one computation is run
twice with the same shapes on the same machine.

Set EDGE_GLASS_NUMERICS_LOG=<file> to append one JSON line per comparison (test, what, max
|diff|, scale, ratio, rtol): run a test file on a few kernel configurations to size a bound
(ATEN_CPU_CAPABILITY=default, OMP_NUM_THREADS=1, MKL_CBWR=COMPATIBLE, ONEDNN_MAX_CPU_ISA=SSE41).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

FP32_EPS = float(np.finfo(np.float32).eps)
FP32_SUM = 1e-6
FP32_OPS = 1e-5
FP32_NET = 1e-4


def _as_float64(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor (any dtype, any device)
        x = x.detach().to("cpu").double().numpy()
    return np.asarray(x, dtype=np.float64)


@dataclass(frozen=True)
class Gap:
    max_abs_diff: float
    scale: float

    @property
    def ratio(self) -> float:
        if self.scale == 0:
            return 0.0 if self.max_abs_diff == 0 else float("inf")
        return self.max_abs_diff / self.scale

    def __str__(self) -> str:
        return f"max |diff| {self.max_abs_diff:.3g}, scale {self.scale:.3g}, ratio {self.ratio:.3g}"


def rel_gap(actual, expected, scale: float | None = None) -> Gap:
    """max |actual - expected| and the scale it is relative to (max |expected| unless given)."""
    a, e = _as_float64(actual), _as_float64(expected)
    assert a.shape == e.shape, f"shapes differ: {a.shape} vs {e.shape}"
    assert np.isfinite(a).all() and np.isfinite(e).all(), "non-finite values"
    diff = float(np.abs(a - e).max()) if a.size else 0.0
    if scale is None:
        scale = float(np.abs(e).max()) if e.size else 0.0
    return Gap(diff, float(scale))


def assert_close_rel(actual, expected, rtol: float, what: str = "values", *, scale: float | None = None) -> Gap:
    """Assert max |actual - expected| <= rtol * scale (scale: max |expected| unless given)."""
    gap = rel_gap(actual, expected, scale)
    log = os.environ.get("EDGE_GLASS_NUMERICS_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" (")[0], "what": what,
                                "max_abs_diff": gap.max_abs_diff, "scale": gap.scale, "ratio": gap.ratio, "rtol": rtol}) + "\n")
    assert gap.max_abs_diff <= rtol * gap.scale, f"{what}: {gap} > rtol {rtol:.1e}"
    return gap
