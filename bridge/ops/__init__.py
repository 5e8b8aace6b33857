"""The lowering table: ATen overload -> JAX function, one per overload.

Each family module registers its lowerings with `@lowering(...)` on import
(families of lowerings that differ only in their JAX function go through the
helpers of `families.py`, which call the same decorator).
"""

from bridge.ops import (  # noqa: E402,F401  (imported for registration)
    activations,
    attention,
    backward,
    comparison,
    conv,
    creation,
    distance,
    elementwise,
    fft,
    histograms,
    indexing,
    linalg,
    losses,
    matmul,
    misc,
    normalization,
    pooling,
    random,
    recurrent,
    reductions,
    resampling,
    segments,
    shape,
    sorting,
    special,
    statistics,
)
from bridge.ops.registry import LOWERINGS, LoweringContext, lowering

__all__ = ["LOWERINGS", "LoweringContext", "lowering"]
