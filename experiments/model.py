"""The neural vector field of the paper experiments: an MLP with one hidden layer."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp


class VectorField(eqx.Module):
    """MLP vector field: one hidden layer, tanh.

    Time-dependent models see concat(t, y).
    """

    mlp: eqx.nn.MLP
    time_dependent: bool = eqx.field(static=True)

    def __init__(
        self, dim: int, width: int, *, key: jax.Array, time_dependent: bool = False
    ):
        in_size = dim + 1 if time_dependent else dim
        self.mlp = eqx.nn.MLP(
            in_size,
            dim,
            width,
            depth=1,
            activation=jnp.tanh,
            dtype=jnp.float64,
            key=key,
        )
        self.time_dependent = time_dependent

    def __call__(self, t: jax.Array, y: jax.Array) -> jax.Array:
        if self.time_dependent:
            y = jnp.concatenate([jnp.asarray(t, y.dtype)[None], y])
        return self.mlp(y)


def vector_field(t: jax.Array, y: jax.Array, model: VectorField) -> jax.Array:
    """`diffrax.ODETerm` vector field with the model as `args`.

    The model travels as `args` (the documented revdiffrax usage), so every adjoint
    sees the parameters as an explicit input of the solve.
    """
    return model(t, y)
