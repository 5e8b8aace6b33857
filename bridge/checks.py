"""Run-time checks: what torch refuses at run time is an error here too.

torch raises on an out-of-range index or an integer division by zero, and a
value that torch computes in int64 must come out exact. JAX computes a number
in those cases (a clamped or NaN row, -1, a wrapped integer) because a
compiled program cannot raise. A lowering records such a condition with
`ctx.require(ok, error, message)`; the interpreter collects them as `Check`s,
and the caller of the translated program turns a failed one into an error:

- called eagerly (concrete arrays), the program returns one flag per check and
  `raise_failed` raises the check's own exception type (IndexError,
  ZeroDivisionError, X64Error) with its message;
- called under a JAX transform (`jit`, `grad`, `vmap`), `stage` puts the flags
  into the program behind a `lax.cond`, and a failed check stops the program
  when it runs: JAX raises `JaxRuntimeError` carrying the same message. The
  host is only called when a check fails.

`torch_to_jax(..., checks=False)` leaves the checks out: out-of-range indices
then follow JAX's rules (clamped gathers, dropped scatter updates) and a value
computed in int64 that does not fit int32 wraps. Use it only for inputs known
to be valid, e.g. to serialise the program or to shave the last microsecond.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


@dataclasses.dataclass
class Check:
    """A condition torch enforces at run time: `ok` must be true."""

    ok: Any  # boolean scalar, traced
    error: type[Exception]
    message: str
    where: str = ""  # the op, module path and source line (filled by the interpreter)

    def exception(self) -> Exception:
        where = f" [{self.where}]" if self.where else ""
        return self.error(f"{self.message}{where}")


def flags(checks: Sequence[Check]) -> jax.Array | None:
    """One boolean per check (True: holds), or None when there are none."""
    if not checks:
        return None
    return jnp.stack([jnp.asarray(c.ok, bool) for c in checks])


def raise_failed(exceptions: Sequence[Exception], oks: Any) -> None:
    """Raise the exception of the first failed check (eager calls).

    `exceptions` are the checks' `exception()`s, taken when the program was
    traced; `oks` is what `flags` computed.
    """
    if oks is None:
        return
    for e, ok in zip(exceptions, np.asarray(oks), strict=True):
        if not ok:
            raise type(e)(*e.args)


def stage(checks: Sequence[Check]) -> None:
    """Make a failed check stop the running program with its message (traced calls)."""
    oks = flags(checks)
    if oks is None:
        return
    exceptions = [c.exception() for c in checks]

    def fail(values: np.ndarray) -> None:
        # Under vmap, `values` carries a batch axis; any failing example fails.
        values = np.asarray(values).reshape(-1, len(exceptions))
        for i, e in enumerate(exceptions):
            if not values[:, i].all():
                raise type(e)(*e.args)

    lax.cond(
        jnp.all(oks),
        lambda v: None,
        lambda v: jax.debug.callback(fail, v),
        oks,
    )
