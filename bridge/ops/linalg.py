"""linalg ATen ops.

What torch.export leaves for torch.linalg.* once the composite ops are
decomposed: the LAPACK-backed primitives (`_linalg_solve_ex`, `_linalg_svd`,
`_linalg_eigh`, `linalg_qr`, `linalg_lu_factor_ex`, ...). JAX calls the same
LAPACK routines on CPU (getrf, potrf, geqrf/orgqr, gesdd, syevd, geev), so
where a factorisation is not unique (signs of QR/SVD/eigenvectors) the
results follow the same convention as torch's.

LAPACK's `info` outputs are always 0 here: JAX reports a failed
factorisation with NaNs instead of an error code. `pivots` follow torch's
(and LAPACK's) 1-based convention.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import torch
from jax import lax

from bridge.ops.registry import lowering

aten = torch.ops.aten


def _mT(x):
    return jnp.swapaxes(x, -1, -2)


def _mH(x):
    return jnp.conj(_mT(x))


def _broadcast_batch(a, b):
    """Broadcast the batch dimensions (all but the last two) of `a` and `b`."""
    batch = jnp.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return jnp.broadcast_to(a, batch + a.shape[-2:]), jnp.broadcast_to(b, batch + b.shape[-2:])


def _zeros(ctx, i):
    return jnp.zeros(ctx.shape_of(i), ctx.dtype_of(i))


def _lu(a):
    """LU factors and torch's 1-based int32 pivots."""
    lu, pivots, _ = lax.linalg.lu(a)
    return lu, (pivots + 1).astype(jnp.int32)


def _tri_solve(a, b, *, lower, left=True, transpose=False, conjugate=False, unit=False):
    a, b = _broadcast_batch(a, b)
    return lax.linalg.triangular_solve(
        a, b, left_side=left, lower=lower, transpose_a=transpose, conjugate_a=conjugate, unit_diagonal=unit
    )


def _hermitian_from(a, lower):
    """The Hermitian matrix whose `lower` (or upper) triangle is that of `a`."""
    t = jnp.tril(a) if lower else jnp.triu(a)
    d = jnp.real(jnp.diagonal(t, axis1=-2, axis2=-1)) if jnp.iscomplexobj(a) else None
    full = t + _mH(jnp.tril(a, -1) if lower else jnp.triu(a, 1))
    if d is not None:  # LAPACK ignores the imaginary part of the diagonal
        eye = jnp.eye(a.shape[-1], dtype=bool)
        full = jnp.where(eye, d[..., None, :].astype(a.dtype), full)
    return full


def _as_if_full(used, a):
    """`used` in value, but differentiated as `a` itself (straight-through).

    torch's backward formulas for cholesky, eigh and cholesky_solve treat every
    entry of the input as used (a Hermitian gradient for cholesky and eigh, a
    full one for the factor of cholesky_solve), although LAPACK reads one
    triangle.
    """
    return a + lax.stop_gradient(used - a)


def _cholesky(a, upper):
    a = _as_if_full(_hermitian_from(a, lower=not upper), a)
    l_ = lax.linalg.cholesky(a, symmetrize_input=True)
    return _mH(l_) if upper else l_


@lowering(aten._linalg_check_errors.default)
def _linalg_check_errors(ctx, info, api_name, *, is_matrix):
    return None


def _solve(a, b, left):
    """X with A X = B (left) or X A = B, B a (batch of) vector(s) or matrices."""
    vector = b.ndim == 1 or (b.ndim == a.ndim - 1 and b.shape == a.shape[:-1])
    if vector:
        b = b[..., None]
    a, b = (a, b) if left else (_mT(a), _mT(b))
    x = jnp.linalg.solve(*_broadcast_batch(a, b))
    x = x if left else _mT(x)
    return x[..., 0] if vector else x


# The composite linalg ops below would decompose into calls of the effectful
# `_linalg_check_errors`; lowering them directly keeps the graph pure.
@lowering(aten.linalg_solve.default)
def linalg_solve(ctx, a, b, *, left=True):
    return _solve(a, b, left)


@lowering(aten.linalg_inv.default)
def linalg_inv(ctx, a):
    return jnp.linalg.inv(a)


@lowering(aten.linalg_cholesky.default)
def linalg_cholesky(ctx, a, *, upper=False):
    return _cholesky(a, upper)


@lowering(aten.linalg_lu_factor.default)
def linalg_lu_factor(ctx, a, *, pivot=True):
    if not pivot:
        raise NotImplementedError("JAX has no LU factorisation without pivoting (lu_factor(pivot=False))")
    return _lu(a)


@lowering(aten._lu_with_info.default)
def _lu_with_info(ctx, a, pivot=True, check_errors=True):
    return linalg_lu_factor_ex(ctx, a, pivot=pivot)


@lowering(aten._linalg_solve_ex.default)
def _linalg_solve_ex(ctx, a, b, *, left=True, check_errors=False):
    lu, pivots = _lu(jnp.broadcast_to(a if left else _mT(a), ctx.shape_of(1)))
    return _solve(a, b, left), lu, pivots, _zeros(ctx, 3)


@lowering(aten.linalg_cholesky_ex.default)
def linalg_cholesky_ex(ctx, a, *, upper=False, check_errors=False):
    return _cholesky(a, upper), _zeros(ctx, 1)


@lowering(aten.cholesky.default)
def cholesky(ctx, a, upper=False):
    return _cholesky(a, upper)


def _gram(factor, upper):
    """A = U^H U (upper) or L L^H, from the triangle LAPACK reads."""
    f = _as_if_full(jnp.triu(factor) if upper else jnp.tril(factor), factor)
    return _mH(f) @ f if upper else f @ _mH(f)


@lowering(aten.cholesky_solve.default)
def cholesky_solve(ctx, b, factor, upper=False):
    return jnp.linalg.solve(*_broadcast_batch(_gram(factor, upper), b))


@lowering(aten.cholesky_inverse.default)
def cholesky_inverse(ctx, factor, upper=False):
    return jnp.linalg.inv(_gram(factor, upper))


@lowering(aten.linalg_qr.default)
def linalg_qr(ctx, a, mode="reduced"):
    if mode == "r":
        return _zeros(ctx, 0), jnp.linalg.qr(a, mode="r")
    q, r = jnp.linalg.qr(a, mode=mode)
    return q, r


@lowering(aten._linalg_svd.default)
def _linalg_svd(ctx, a, full_matrices=False, compute_uv=True, *, driver=None):
    if not compute_uv:
        return _zeros(ctx, 0), jnp.linalg.svd(a, compute_uv=False), _zeros(ctx, 2)
    u, s, vh = jnp.linalg.svd(a, full_matrices=False)
    m, n = a.shape[-2:]
    if full_matrices and m != n:
        # JAX differentiates only the reduced SVD. The extra columns of U (or
        # rows of Vh) are an arbitrary basis, which torch's backward ignores too.
        u_full, _, vh_full = jnp.linalg.svd(lax.stop_gradient(a), full_matrices=True)
        if m > n:
            u = jnp.concatenate([u, u_full[..., :, n:]], axis=-1)
        else:
            vh = jnp.concatenate([vh, vh_full[..., m:, :]], axis=-2)
    return u, s, vh


@lowering(aten._linalg_eigh.default)
def _linalg_eigh(ctx, a, UPLO="L", compute_v=True):
    w, v = jnp.linalg.eigh(_as_if_full(_hermitian_from(a, lower=UPLO == "L"), a), symmetrize_input=True)
    return w, (v if compute_v else _zeros(ctx, 1))


@lowering(aten.linalg_eig.default)
def linalg_eig(ctx, a):
    w, v = jnp.linalg.eig(a)
    return w.astype(ctx.dtype_of(0)), v.astype(ctx.dtype_of(1))


@lowering(aten.linalg_inv_ex.default)
def linalg_inv_ex(ctx, a, *, check_errors=False):
    return jnp.linalg.inv(a), _zeros(ctx, 1)


@lowering(aten._linalg_det.default)
def _linalg_det(ctx, a):
    lu, pivots = _lu(a)
    if a.shape[-1] == 0:  # det of a 0x0 matrix is 1; jnp's gradient rule fails on it
        return jnp.ones(a.shape[:-2], a.dtype), lu, pivots
    return jnp.linalg.det(a), lu, pivots


@lowering(aten._linalg_slogdet.default)
def _linalg_slogdet(ctx, a):
    sign, logabsdet = jnp.linalg.slogdet(a)
    lu, pivots = _lu(a)
    return sign, logabsdet, lu, pivots


@lowering(aten.linalg_lu.default)
def linalg_lu(ctx, a, *, pivot=True):
    if not pivot:
        raise NotImplementedError("JAX has no LU factorisation without pivoting (linalg.lu(pivot=False))")
    lu, _, perm = lax.linalg.lu(a)
    return _unpack(lu, perm, ctx.dtype_of(0))


@lowering(aten.linalg_lu_factor_ex.default)
def linalg_lu_factor_ex(ctx, a, *, pivot=True, check_errors=False):
    if not pivot:
        raise NotImplementedError("JAX has no LU factorisation without pivoting (lu_factor(pivot=False))")
    lu, pivots = _lu(a)
    return lu, pivots, _zeros(ctx, 2)


def _permutation(pivots, m):
    """The row permutation `perm` with A[perm] = L U, from 1-based pivots."""
    return lax.linalg.lu_pivots_to_permutation(pivots.astype(jnp.int32) - 1, m)


def _take_rows(x, perm):
    return jnp.take_along_axis(x, perm[..., :, None], axis=-2)


@lowering(aten.linalg_lu_solve.default)
def linalg_lu_solve(ctx, lu, pivots, b, *, left=True, adjoint=False):
    if not left:  # X A = B  <=>  A^H X^H = B^H
        return _mH(linalg_lu_solve(ctx, lu, pivots, _mH(b), left=True, adjoint=not adjoint))
    batch = jnp.broadcast_shapes(lu.shape[:-2], b.shape[:-2])
    m = lu.shape[-1]
    lu = jnp.broadcast_to(lu, batch + lu.shape[-2:])
    b = jnp.broadcast_to(b, batch + b.shape[-2:])
    perm = jnp.broadcast_to(_permutation(pivots, m), batch + (m,))
    if not adjoint:  # A = P^T L U
        y = _tri_solve(lu, _take_rows(b, perm), lower=True, unit=True)
        return _tri_solve(lu, y, lower=False)
    y = _tri_solve(lu, b, lower=False, transpose=True, conjugate=True)
    y = _tri_solve(lu, y, lower=True, unit=True, transpose=True, conjugate=True)
    return _take_rows(y, jnp.argsort(perm, axis=-1))


def _unpack(lu, perm, p_dtype):
    """P, L, U with A = P L U, from packed LU factors and A[perm] = L U."""
    m, n = lu.shape[-2:]
    k = min(m, n)
    p = _mT(jax.nn.one_hot(perm, m, dtype=p_dtype))
    l_ = jnp.tril(lu[..., :, :k], -1) + jnp.eye(m, k, dtype=lu.dtype)
    return p, l_, jnp.triu(lu[..., :k, :])


@lowering(aten.lu_unpack.default)
def lu_unpack(ctx, lu, pivots, unpack_data=True, unpack_pivots=True):
    p, l_, u = _unpack(lu, _permutation(pivots, lu.shape[-2]), ctx.dtype_of(0))
    p = jnp.broadcast_to(p, ctx.shape_of(0)) if unpack_pivots else _zeros(ctx, 0)
    if not unpack_data:
        return p, _zeros(ctx, 1), _zeros(ctx, 2)
    return p, l_, u


@lowering(aten.triangular_solve.default)
def triangular_solve(ctx, b, a, upper=True, transpose=False, unitriangular=False):
    x = _tri_solve(a, b, lower=not upper, transpose=transpose, unit=unitriangular)
    return x, jnp.broadcast_to(a, ctx.shape_of(1))


@lowering(aten.linalg_solve_triangular.default)
def linalg_solve_triangular(ctx, a, b, *, upper, left=True, unitriangular=False):
    return _tri_solve(a, b, lower=not upper, left=left, unit=unitriangular)


@partial(jax.custom_jvp, nondiff_argnums=(3,))
def _pinv(a, atol, rtol, hermitian):
    if hermitian:
        # torch's eigh reads the lower triangle only.
        w, v = jnp.linalg.eigh(_hermitian_from(a, lower=True), symmetrize_input=True)
        s, u, vh = jnp.abs(w), v * jnp.sign(w)[..., None, :].astype(a.dtype), _mH(v)
    else:
        u, s, vh = jnp.linalg.svd(a, full_matrices=False)
    smax = jnp.max(s, axis=-1, initial=0.0)
    threshold = jnp.maximum(atol, rtol * smax)[..., None]
    s_inv = jnp.where(s > threshold, 1 / jnp.where(s > threshold, s, 1), 0).astype(a.dtype)
    return (_mH(vh) * s_inv[..., None, :]) @ _mH(u)


@_pinv.defjvp
def _pinv_jvp(hermitian, primals, tangents):
    # The derivative of the pseudo-inverse at fixed rank (Golub & Pereyra,
    # 1973), as torch's pinv_backward and jnp.linalg.pinv use it. Like torch,
    # it takes `a` whole, also where `hermitian` made the value read one triangle.
    a, atol, rtol = primals
    da = tangents[0]
    p = _pinv(a, atol, rtol, hermitian)
    eye_m = jnp.eye(a.shape[-2], dtype=a.dtype)
    eye_n = jnp.eye(a.shape[-1], dtype=a.dtype)
    dp = -p @ da @ p + (eye_n - p @ a) @ _mH(da) @ _mH(p) @ p + p @ _mH(p) @ _mH(da) @ (eye_m - a @ p)
    return p, dp


@lowering(aten.linalg_pinv.atol_rtol_tensor)
def linalg_pinv(ctx, a, *, atol=None, rtol=None, hermitian=False):
    m, n = a.shape[-2:]
    real = jnp.finfo(a.dtype).dtype
    if rtol is None:
        rtol = 0.0 if atol is not None else jnp.finfo(a.dtype).eps * max(m, n)
    atol = jnp.asarray(0.0 if atol is None else atol, real)
    return _pinv(a, atol, jnp.asarray(rtol, real), hermitian)


_WIDER = {jnp.dtype(jnp.float16): jnp.float64, jnp.dtype(jnp.bfloat16): jnp.float64,
          jnp.dtype(jnp.float32): jnp.float64, jnp.dtype(jnp.complex64): jnp.complex128}


@lowering(aten.linalg_matrix_exp.default)
def linalg_matrix_exp(ctx, a):
    """exp(A) by scaling and squaring, in float64 (complex128) and rounded back.

    Each squaring doubles the relative error of the approximant, so in float32
    the small entries of exp(A) for a matrix of norm ~30 come out wrong in
    their third digit (torch's own float32 kernel as well); computed in
    float64 every entry is the float64 value correctly rounded. JAX's expm
    gives NaN beyond `max_squarings` squarings: allow every squaring the
    dtype's range can need, so only a true overflow gives inf/NaN. (A JAX
    without `jax.enable_x64` (0.7) cannot nest float64 in a float32 trace and
    computes in the input's dtype.)
    """
    wide = _WIDER.get(jnp.dtype(a.dtype), a.dtype)
    narrow = jsl.expm(a, max_squarings=int(jnp.finfo(a.dtype).maxexp) + 1)
    # JAX 0.7 (the torch_xla environment) cannot nest float64 in a float32 trace.
    if wide == a.dtype or not hasattr(jax, "enable_x64"):
        return narrow.astype(ctx.dtype)
    with jax.enable_x64(True):
        value = jsl.expm(lax.stop_gradient(a).astype(wide), max_squarings=int(jnp.finfo(wide).maxexp) + 1)
        value = value.astype(ctx.dtype)
    # The derivative is JAX's, of the same algorithm in the input's dtype: a
    # float64 computation cannot be transposed once x64 is off again (the
    # backward pass runs outside this trace). It adds exactly zero to the value.
    return value + jnp.where(jnp.isfinite(narrow), narrow - lax.stop_gradient(narrow), 0)


@lowering(aten.linalg_householder_product.default)
def linalg_householder_product(ctx, a, tau):
    return lax.linalg.householder_product(a, tau)


@lowering(aten.ormqr.default)
def ormqr(ctx, a, tau, c, left=True, transpose=False):
    return lax.linalg.ormqr(a, tau, c, left=left, transpose=transpose)


@lowering(aten.linalg_cross.default)
def linalg_cross(ctx, a, b, *, dim=-1):
    shape = jnp.broadcast_shapes(a.shape, b.shape)
    a, b = jnp.broadcast_to(a, shape), jnp.broadcast_to(b, shape)
    return jnp.cross(a, b, axis=dim).astype(ctx.dtype)


@lowering(aten.trace.default)
def trace(ctx, a):
    return jnp.trace(a).astype(ctx.dtype)


@lowering(aten.kron.default)
def kron(ctx, a, b):
    return jnp.kron(a, b).astype(ctx.dtype)
