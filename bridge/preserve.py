"""Capture leaves the user's module exactly as it was, whatever happens.

torch.export swaps a module's parameters and buffers for fake tensors while
it traces and puts them back when it finishes; an exception at the wrong
moment could leave a fake tensor behind. And the traced forward runs the
module's Python: a cache it fills (timm's LeViT stores its attention biases
in a dict attribute in eval mode) receives fake tensors, which torch 2.13's
export clears again but torch 2.9's does not, so the module would then fail
or compute garbage in torch. `module_preserved` snapshots every module's
parameters, buffers and plain attributes (and the contents of the dicts and
lists among them, so their identity is kept too) and restores them on exit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["module_preserved"]

_DEPTH = 3  # how deep containers inside attributes are restored


@contextlib.contextmanager
def module_preserved(module: torch.nn.Module) -> Iterator[None]:
    """Put back every parameter, buffer, flag and plain attribute of `module` and its submodules."""
    saved = [(m, dict(vars(m)), dict(m._parameters), dict(m._buffers)) for m in module.modules()]
    contents: list[tuple[Any, Any]] = []
    for _, attrs, _, _ in saved:
        for value in attrs.values():
            _snapshot(value, contents, _DEPTH)
    try:
        yield
    finally:
        for m, attrs, params, buffers in saved:
            for name in [n for n in vars(m) if n not in attrs]:
                delattr(m, name)  # added by the traced forward
            for name, value in attrs.items():
                if vars(m).get(name, _MISSING) is not value:
                    object.__setattr__(m, name, value)
            _restore(m._parameters, params)
            _restore(m._buffers, buffers)
        for container, items in contents:
            _restore(container, items)


_MISSING = object()


def _snapshot(value: Any, out: list[tuple[Any, Any]], depth: int) -> None:
    """Record the contents of `value` if it is a dict or list (and of those inside it)."""
    if depth == 0 or isinstance(value, torch.nn.Module):
        return
    if isinstance(value, dict):
        out.append((value, dict(value)))
        inner = value.values()
    elif isinstance(value, list):
        out.append((value, list(value)))
        inner = value
    elif isinstance(value, tuple):
        inner = value
    else:
        return
    for item in inner:
        _snapshot(item, out, depth - 1)


def _restore(container: Any, items: Any) -> None:
    """Give `container` (a dict or list) back the `items` it held, if they changed."""
    if isinstance(container, dict):
        if container.keys() != items.keys() or any(container[k] is not v for k, v in items.items()):
            container.clear()
            container.update(items)
    elif len(container) != len(items) or any(a is not b for a, b in zip(container, items, strict=False)):
        container[:] = items
