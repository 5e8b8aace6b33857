"""The error of `bridge.callback`."""

from __future__ import annotations

__all__ = ["CallbackError"]


class CallbackError(RuntimeError):
    """A wrapped torch function broke the contract of `bridge.callback.wrap`."""
