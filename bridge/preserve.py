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

__all__ = ["module_preserved", "walk"]

DEPTH = 4  # how deep `walk` goes into the containers inside an attribute


def walk(value: Any, path: str, depth: int = DEPTH) -> Iterator[tuple[str, Any]]:
    """`(path, value)`, then the same for the items of the dicts, lists and tuples in it.

    Items are named like Python indexes them (`cache['cpu']`, `blocks[0]`);
    submodules are not entered (`module.modules()` visits them).
    """
    yield path, value
    if depth == 0 or isinstance(value, torch.nn.Module):
        return
    if isinstance(value, dict):
        items = ((f"{path}[{k!r}]", v) for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    else:
        return
    for item_path, item in items:
        yield from walk(item, item_path, depth - 1)


@contextlib.contextmanager
def module_preserved(module: torch.nn.Module) -> Iterator[None]:
    """Put back every attribute of `module` and its submodules, and the contents of their containers.

    Parameters, buffers and submodules live in dicts among the attributes
    (`_parameters`, `_buffers`, `_modules`), so they are restored with them.
    """
    saved = [(m, dict(vars(m))) for m in module.modules()]
    contents = [
        (c, dict(c) if isinstance(c, dict) else list(c))
        for _, attrs in saved
        for value in attrs.values()
        for _, c in walk(value, "")
        if isinstance(c, (dict, list))
    ]
    try:
        yield
    finally:
        for m, attrs in saved:
            for name in [n for n in vars(m) if n not in attrs]:
                delattr(m, name)  # added by the traced forward
            for name, value in attrs.items():
                if vars(m).get(name, _MISSING) is not value:
                    object.__setattr__(m, name, value)
        for container, items in contents:
            _restore(container, items)


_MISSING = object()


def _restore(container: Any, items: Any) -> None:
    """Give `container` (a dict or list) back the `items` it held, if they changed."""
    if isinstance(container, dict):
        if container.keys() != items.keys() or any(container[k] is not v for k, v in items.items()):
            container.clear()
            container.update(items)
    elif len(container) != len(items) or any(a is not b for a, b in zip(container, items, strict=False)):
        container[:] = items
