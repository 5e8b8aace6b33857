"""Shape queries, assertions and other bookkeeping ops that exported graphs contain.

`sym_size` and friends evaluate to the Python values torch recorded, or, in a
graph captured with dynamic shapes, to the inputs' (symbolic) JAX dimensions. Assertions on tensor values run at run time
through `jax.debug.callback`, so they hold under `jit`, `vmap` and `grad` too.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import torch

from bridge import specialise
from bridge.ops.registry import lowering

aten = torch.ops.aten


def _input_meta(ctx, i: int = 0):
    """torch's FakeTensor for the `i`-th argument of the node (strides, offsets)."""
    return ctx.node.args[i].meta["val"]


@lowering(aten.sym_size.int)
def sym_size(ctx, x, dim):
    return x.shape[dim]


@lowering(aten.sym_stride.int)
def sym_stride(ctx, x, dim):
    return ctx.size(_input_meta(ctx).stride(dim))


@lowering(aten.sym_numel.default)
def sym_numel(ctx, x):
    return math.prod(x.shape)


@lowering(aten.sym_storage_offset.default)
def sym_storage_offset(ctx, x):
    return ctx.size(_input_meta(ctx).storage_offset())


@lowering(aten.sym_is_contiguous.default)
def sym_is_contiguous(ctx, x, memory_format=torch.contiguous_format):
    return bool(_input_meta(ctx).is_contiguous(memory_format=memory_format))


@lowering(aten._assert_tensor_metadata.default)
def assert_tensor_metadata(ctx, a, size=None, stride=None, dtype=None, *, device=None, layout=None):
    # Checked when torch captured the graph; the interpreter checks every result's
    # shape and dtype against the same record.
    return None


@lowering(aten.sym_constrain_range.default, aten.sym_constrain_range_for_size.default)
def sym_constrain_range(ctx, size, *, min=None, max=None):
    return None


def _raise_unless(value, message: str) -> None:
    if not np.all(np.asarray(value)):
        raise AssertionError(message)


def _assert(ctx, value, message: str, error: type[Exception] = AssertionError) -> None:
    """Raise `error(message)` unless `value` holds: now if it is static, else at run time.

    A run-time assertion is a check like every other (`ctx.require`): staged
    into the program, and left out with `checks=False`, as exported programs
    are (they cannot call back into Python; docs/export.md).
    """
    if isinstance(value, (bool, int, float, np.bool_)):
        _raise_unless(value, message)
    else:
        ctx.require(jnp.asarray(value).astype(bool), error, message)


@lowering(aten._assert_scalar.default)
def assert_scalar(ctx, value, assert_msg):
    # A value read from a tensor is a specialised guard (bridge/specialise.py):
    # a failed check raises the error torch raised on the branch it rules out.
    _assert(ctx, value, assert_msg, specialise.error_type(assert_msg))


@lowering(aten._assert_async.default, aten._assert_async.msg)
def assert_async(ctx, x, assert_msg="Expected Tensor with single nonzero value, but got zero"):
    _assert(ctx, x, assert_msg)


@lowering(aten._make_dep_token.default)
def make_dep_token(ctx, **options):
    return jnp.zeros(ctx.shape, ctx.dtype)


@lowering(aten._functional_assert_async.msg)
def functional_assert_async(ctx, x, assert_msg, dep_token):
    _assert(ctx, x, assert_msg)
    return dep_token


@lowering(aten._functional_assert_scalar.default)
def functional_assert_scalar(ctx, value, assert_msg, dep_token):
    _assert(ctx, value, assert_msg, specialise.error_type(assert_msg))
    return dep_token


@lowering(aten._local_scalar_dense.default)
def local_scalar_dense(ctx, x):
    if specialise.feeds_only_checks(ctx.node):
        # The value only reaches run-time assertions (a guard specialised at
        # capture): a traced scalar serves them.
        return jnp.reshape(x, ())
    raise NotImplementedError(
        f"{ctx.node.target}: the torch code turns a tensor into a Python number (.item(), "
        "int(tensor), float(tensor), or a data-dependent branch); inside a JAX trace the value "
        "is not known. Keep it a tensor (for example torch.where instead of an if), or run the "
        "module with mode='callback'."
    )


@lowering(aten.resize_.default, aten.resize.default)
def resize(ctx, x, size, *, memory_format=None):
    if tuple(size) != tuple(x.shape):
        raise NotImplementedError(
            f"{ctx.node.target}: resizing a tensor of shape {tuple(x.shape)} to {tuple(size)} "
            "changes its storage, which a JAX array cannot do. Create a new tensor of the "
            "target shape instead (torch.empty / new_empty)."
        )
    return x
