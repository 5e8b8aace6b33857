"""params.safetensors / state.safetensors: the module's tensors as they are, keyed like torch names them.

constants.safetensors (format="source"): arrays the program closes over that are
too large to print as code.

Tensors are written in torch's dtype (an int64 buffer stays int64 in the file;
model.py's `load` casts to the dtype the program takes). safetensors orders its
header itself and takes no timestamps, so the bytes depend only on the tensors.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def serialize(tensors: dict[str, torch.Tensor], entries: list) -> bytes:
    """The safetensors bytes of `tensors`, in the order of `entries` ([name, shape, dtype])."""
    from safetensors.torch import save  # only when exporting: `import bridge` does not need it

    # Each tensor copied: safetensors refuses tensors that share storage (views, tied buffers).
    data = {name: tensors[name].detach().cpu().contiguous().clone() for name, _, _ in entries}
    return save(data)


def serialize_arrays(arrays: dict[str, Any]) -> bytes:
    """The safetensors bytes of NumPy arrays (constants.safetensors)."""
    from safetensors.numpy import save

    return save({name: np.ascontiguousarray(a) for name, a in arrays.items()})
