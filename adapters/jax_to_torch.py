"""JAX -> torch: (apply, params) -> nn.Module, JAX function -> torch function."""


def jax_to_torch(*args, **kwargs):
    raise NotImplementedError("jax_to_torch is being written (issue 6)")
