"""The lowering table: ATen overload -> JAX function, one per overload.

Each family module registers its lowerings with `@lowering(...)` on import.
"""

from bridge.ops import (  # noqa: E402,F401  (imported for registration)
    backward,
    creation,
    elementwise,
    fft,
    indexing,
    linalg,
    misc,
    nn,
    random,
    reductions,
    shape,
    special,
)
from bridge.ops.registry import LOWERINGS, LoweringContext, lowering

__all__ = ["LOWERINGS", "LoweringContext", "lowering"]
