"""Pure JAX functions of flat arrays: the unit `bridge.jax_to_torch` runs.

Every call of a wrapped module or function reduces to one `JaxFunction`:
`fn(*arrays) -> (primary, aux)`, compiled with `jax.jit`, plus the functions
derived from it for autograd (`recompute_vjp`, `with_residuals`,
`residual_vjp`), forward-mode AD (`jvp`) and batching (`vmapped`). Nothing
here knows torch: see `jax_autograd.py` and `jax_call.py` for how tensors
reach these functions.
"""

from __future__ import annotations

import functools
import itertools
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from bridge.adapters.jax_boundary import Views, decode, encode, key_impls

__all__ = ["Example", "Gradients", "JaxFunction", "Residuals", "function_for_key", "vjp_impl"]


# The derived functions take their example arguments (arrays or
# ShapeDtypeStructs, for `JaxFunction`'s eval_shape) as a thunk, called only
# when the function is new: a cached one costs the caller nothing.
Example = Callable[[], Sequence[Any]]


def _inexact(x: Any) -> bool:
    return jnp.issubdtype(x.dtype, jnp.inexact)


def _conj(x: Any) -> Any:
    return jnp.conj(x) if jnp.iscomplexobj(x) else x


def _var(x: Any) -> Any:
    # A traced value's jaxpr variable: two tracers of one input share it.
    return getattr(x, "val", x)


@jax.tree_util.register_pytree_node_class
class Residuals:
    """The residuals of one forward's VJP, minus those that are just its inputs.

    `jax.vjp` keeps the primal inputs (weights, activations fed in) among its
    residuals; returning them from `jax.jit` would copy them on every call, so
    they are left out here and taken from the inputs again in the backward.
    `take[i]` is the input index of VJP leaf i, or -1 - j for `leaves[j]`;
    `impls[j]` is the PRNG implementation of `leaves[j]` if it is a typed key
    (None otherwise). All three are static, so `jax.eval_shape` of a forward
    returns them: the residuals' structure is a result, not a side effect.
    """

    def __init__(self, leaves: list[Any], treedef: Any, take: tuple, impls: tuple) -> None:
        self.leaves, self.treedef, self.take, self.impls = leaves, treedef, take, impls

    @classmethod
    def of(cls, vjp: Callable, xs: Sequence[Any]) -> Residuals:
        leaves, treedef = jax.tree_util.tree_flatten(vjp)
        where = {id(_var(x)): i for i, x in enumerate(xs)}
        take, kept = [], []
        for leaf in leaves:
            i = where.get(id(_var(leaf)))
            if i is None:
                take.append(-1 - len(kept))
                kept.append(leaf)
            else:
                take.append(i)
        return cls(kept, treedef, tuple(take), key_impls(kept))

    def encoded(self) -> list[Any]:
        """The kept leaves as arrays torch can hold (typed keys as key data)."""
        return [encode(x) for x in self.leaves]

    def decoded(self, arrays: Sequence[Any]) -> Residuals:
        """These residuals with `arrays` (as `encoded` returns them) for leaves."""
        return Residuals(decode(arrays, self.impls), self.treedef, self.take, self.impls)

    def vjp(self, xs: Sequence[Any]) -> Callable:
        leaves = [xs[i] if i >= 0 else self.leaves[-1 - i] for i in self.take]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)

    def tree_flatten(self) -> tuple[list[Any], tuple]:
        return self.leaves, (self.treedef, self.take, self.impls)

    @classmethod
    def tree_unflatten(cls, static: tuple, leaves: list[Any]) -> Residuals:
        return cls(list(leaves), *static)


@jax.tree_util.register_pytree_node_class
class Gradients:
    """The gradients of a scalar loss for a cotangent of 1, in torch's
    convention, computed by the forward (see `JaxFunction.fwd_vjp`).

    A backward whose cotangent is exactly 1 takes them (once: `take`); any
    other backward recomputes the VJP for its own cotangent, so the answer
    never depends on which path ran.
    """

    def __init__(self, leaves: list[Any]) -> None:
        self.leaves = leaves

    def tree_flatten(self) -> tuple[list[Any], None]:
        return self.leaves, None

    @classmethod
    def tree_unflatten(cls, static: None, leaves: list[Any]) -> Gradients:
        return cls(list(leaves))


def _is_loss(out: Sequence[Any]) -> bool:
    """One differentiable output, a real scalar: what `loss.backward()` differentiates."""
    return len(out) == 1 and out[0].shape == () and jnp.issubdtype(out[0].dtype, jnp.floating)


def vjp_impl(res: Residuals, xs: Sequence[Any], cts: Sequence[Any]) -> list[Any]:
    """Gradients of the inputs, in torch's convention, from a forward's residuals."""
    # torch's gradients of complex values are the conjugates of JAX's.
    return [_conj(g) for g in res.vjp(xs)([_conj(c) for c in cts])]


# key -> function, for the custom op `bridge::jax_call`'s `fn` argument.
#
# Why a process-wide table: a torch.library op takes only tensors, numbers,
# strings and lists of them, and compiled or exported graphs record the op
# with those arguments, so the function a graph calls must be named by a
# number that is valid anywhere in the process. Why weak: a function lives as
# long as the module or torch function that built it (its `Spec` holds it);
# graphs hold only the number, and one calling a dropped function gets a
# clear error instead of keeping it (and what it closes over) alive.
_FUNCTIONS: weakref.WeakValueDictionary[int, JaxFunction] = weakref.WeakValueDictionary()
_keys = itertools.count()


def function_for_key(key: int) -> JaxFunction:
    """The live `JaxFunction` whose `key` is `key`, or a clear error if it was dropped."""
    fn = _FUNCTIONS.get(key)
    if fn is None:
        raise RuntimeError(
            f"bridge::jax_call: JAX function #{key} no longer exists: the module or function "
            "that bridge.jax_to_torch made was deleted, and a compiled or exported graph still "
            "calls it. Keep the module alive as long as graphs that call it run."
        )
    return fn


class JaxFunction:
    """A pure JAX function `fn(*arrays) -> (primary, aux)`, compiled once per input shape.

    `primary` is a pytree of the outputs torch may differentiate (those with
    a floating or complex dtype get gradients); `aux` is a list of outputs
    that carry none (new state, a new PRNG key, residuals). Its output
    structure (`out_def`, `n_primary`, `n_aux`) is `jax.eval_shape`'s answer
    on `example` (the arguments of the call that creates it), and every later
    input shape must give the same structure. Derived functions are cached
    on the function they derive from. `key` names it for the custom op (see
    `function_for_key`); `views` are the owning module's JAX views of its
    tensors.
    """

    def __init__(
        self,
        fn: Callable,
        name: str,
        example: Sequence[Any],
        *,
        remat_policy: Callable | None = None,
        views: Views | None = None,
    ) -> None:
        self.name = name
        self.remat_policy = remat_policy
        self.views = views
        self._fn = fn
        self._derived: dict[tuple, JaxFunction] = {}
        self.out_def: Any = None  # known once eval_shape below answers
        self.n_aux = 0
        self.plain = jax.jit(self.traced)
        self.fwd_vjp = jax.jit(self._fwd_for_backward, static_argnums=0)

        # A jit of its own (not one shared by every function): jit caches its
        # traces per function, and the residuals' tree structure names this
        # function's VJP, so a shared jit would keep every wrapped function's
        # backward alive for the life of the process.
        def apply_vjp(res: Residuals, xs: Sequence[Any], cts: Sequence[Any]) -> list[Any]:
            return vjp_impl(res, xs, cts)

        self.apply_vjp = jax.jit(apply_vjp)
        # The plain jit's own trace (cached by jit), so the first call does not trace again.
        prim, aux = self.plain.eval_shape(*example)
        self.out_def = jax.tree_util.tree_structure(prim)
        self.n_primary, self.n_aux = self.out_def.num_leaves, len(aux)
        self.key = next(_keys)
        _FUNCTIONS[self.key] = self

    def __repr__(self) -> str:
        return f"<JAX function {self.name}>"

    def traced(self, *xs: Any) -> tuple[Any, list[Any]]:
        """`fn` itself, checked against the output structure found at creation."""
        try:
            prim, aux = self._fn(*xs)
        except Exception as e:
            shapes = ", ".join(f"{x.dtype}{list(x.shape)}" for x in xs)
            e.add_note(f"(while bridge.jax_to_torch traced {self.name} on arrays [{shapes}])")
            raise
        aux = list(aux)
        if self.out_def is not None:
            out_def = jax.tree_util.tree_structure(prim)
            if out_def != self.out_def or len(aux) != self.n_aux:
                raise ValueError(
                    f"{self.name} returned {out_def} and {len(aux)} state outputs for these "
                    f"input shapes but {self.out_def} and {self.n_aux} for earlier ones; "
                    "jax_to_torch needs the output structure to be the same for every input "
                    "shape."
                )
        return prim, aux

    def _fwd_vjp(self, diff: tuple[bool, ...], *xs: Any) -> tuple[list, list, Residuals]:
        _, vjp, prim, aux = self._linearize(diff, xs)
        return prim, aux, Residuals.of(vjp, xs)

    def _fwd_for_backward(
        self, diff: tuple[bool, ...], *xs: Any
    ) -> tuple[list, list, Residuals | Gradients]:
        """The forward that autograd runs, with what its backward will need.

        A scalar loss (one differentiable output, 0-d and real) is usually
        differentiated with a cotangent of exactly 1 (`loss.backward()`), so
        its gradients are computed here, in the forward's own XLA program,
        which then fuses the forward and backward as `jax.value_and_grad` does
        (XLA recomputes the cheap elementwise values instead of writing them
        out). What waits for the backward is then the gradients, the size of
        the differentiated inputs, instead of the VJP's residuals. Any other
        output, or a `remat_policy` the user chose, keeps the residuals.
        """
        out, vjp, prim, aux = self._linearize(diff, xs)
        if self.remat_policy is None and _is_loss(out):
            grads = vjp([jnp.ones((), out[0].dtype)])
            return prim, aux, Gradients([_conj(g) for g in grads])
        return prim, aux, Residuals.of(vjp, xs)

    def _linearize(self, diff: tuple[bool, ...], xs: Sequence[Any]) -> tuple:
        """`jax.vjp` of the differentiable outputs in the inputs marked by `diff`:
        (those outputs, the VJP, every primary output, the aux outputs)."""
        idx = [i for i, d in enumerate(diff) if d]

        def g(*d: Any) -> tuple[list[Any], tuple[list[Any], list[Any]]]:
            full = list(xs)
            for i, v in zip(idx, d, strict=True):
                full[i] = v
            prim, aux = self.traced(*full)
            prim = jax.tree_util.tree_leaves(prim)
            # The differentiable outputs, and (unchanged) every primary output in order.
            return [p for p in prim if _inexact(p)], (prim, aux)

        if self.remat_policy is not None:
            g = jax.checkpoint(g, policy=self.remat_policy)
        out, vjp, (prim, aux) = jax.vjp(g, *[xs[i] for i in idx], has_aux=True)
        return out, vjp, prim, aux

    def _derive(self, key: tuple, make: Callable[[], tuple]) -> JaxFunction:
        fn = self._derived.get(key)
        if fn is None:
            body, name, example = make()
            fn = self._derived[key] = JaxFunction(body, name, example, views=self.views)
        return fn

    def recompute_vjp(self, diff: tuple[bool, ...], example: Example) -> JaxFunction:
        """`(*inputs, *cotangents) -> grads of the inputs marked in `diff``.

        Recomputes the forward, so the result can be differentiated again.
        """
        n = len(diff)

        def fn(*a: Any) -> tuple[list[Any], list[Any]]:
            _, _, res = self._fwd_vjp(diff, *a[:n])
            return vjp_impl(res, a[:n], a[n:]), []

        return self._derive(("vjp", diff), lambda: (fn, f"vjp({self.name})", example()))

    def jvp(self, tangents: tuple[bool, ...], example: Example) -> JaxFunction:
        """`(*inputs, *tangents of the marked inputs) -> tangents of the primary outputs`."""
        n = len(tangents)
        idx = [i for i, t in enumerate(tangents) if t]

        def fn(*a: Any) -> tuple[list[Any], list[Any]]:
            xs = list(a[:n])

            def g(*d: Any) -> list[Any]:
                full = list(xs)
                for i, v in zip(idx, d, strict=True):
                    full[i] = v
                prim = jax.tree_util.tree_leaves(self.traced(*full)[0])
                return [p for p in prim if _inexact(p)]

            _, out = jax.jvp(g, tuple(xs[i] for i in idx), tuple(a[n:]))
            return list(out), []

        return self._derive(("jvp", tangents), lambda: (fn, f"jvp({self.name})", example()))

    def vmapped(self, in_axes: tuple[int | None, ...], example: Example) -> JaxFunction:
        """The same function over a batch: `jax.vmap` with every output batched at 0."""
        mapped = jax.vmap(self.traced, in_axes=in_axes, out_axes=0)
        return self._derive(("vmap", in_axes), lambda: (mapped, f"vmap({self.name})", example()))

    def with_residuals(self, diff: tuple[bool, ...], example: Example) -> JaxFunction:
        """`inputs -> (primary, aux + residuals)`: the forward that keeps the VJP's residuals.

        The residuals are `Residuals.encoded()`; `residual_vjp` takes them back.
        """

        def fn(*xs: Any) -> tuple[list[Any], list[Any]]:
            prim, aux, res = self._fwd_vjp(diff, *xs)
            return prim, [*aux, *res.encoded()]

        return self._derive(("res", diff), lambda: (fn, self.name, example()))

    def residual_vjp(self, diff: tuple[bool, ...], sig: tuple) -> JaxFunction:
        """`(*inputs, *residuals, *cotangents) -> grads`, for `with_residuals(diff)`.

        `sig` is the inputs' (shape, dtype) signature; the residuals' structure
        is `jax.eval_shape`'s answer for the forward on those inputs.
        """

        def make() -> tuple[Callable, str, Sequence[Any]]:
            inputs = [jax.ShapeDtypeStruct(s, d) for s, d in sig]
            prim, _, shape = jax.eval_shape(functools.partial(self._fwd_vjp, diff), *inputs)
            encoded = jax.eval_shape(Residuals.encoded, shape)
            n_in, n_res = len(inputs), len(encoded)

            def fn(*a: Any) -> tuple[list[Any], list[Any]]:
                res = shape.decoded(a[n_in : n_in + n_res])
                return vjp_impl(res, a[:n_in], a[n_in + n_res :]), []

            cts = [p for p in prim if _inexact(p)]
            return fn, f"vjp({self.name})", [*inputs, *encoded, *cts]

        return self._derive(("resvjp", diff, sig), make)
