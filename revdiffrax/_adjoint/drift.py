"""The reconstruction drift: how far the backward pass's rebuilt states are from the
states of the forward pass, measured where both are known (`y0`, checkpoints)."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Float, PyTree


def relative_drift(y_rec: PyTree[Array], y_true: PyTree[Array]) -> Float[Array, ""]:
    """Relative 2-norm error $\\|y_{rec} - y\\|_2 / \\|y\\|_2$ (absolute if y = 0)."""
    leaves_rec = jtu.tree_leaves(y_rec)
    leaves_true = jtu.tree_leaves(y_true)
    err = sum(jnp.sum(jnp.abs(a - b) ** 2) for a, b in zip(leaves_rec, leaves_true))
    size = sum(jnp.sum(jnp.abs(b) ** 2) for b in leaves_true)
    err = jnp.sqrt(err)
    size = jnp.sqrt(size)
    return jnp.where(size > 0, err / jnp.where(size > 0, size, 1), err)


_DRIFT_MESSAGE = (
    "ReversibleAdjoint: the backward pass reconstructed the solution with a "
    "relative error above drift_tol={tol}, so the gradient is inaccurate. Use "
    "`ReversibleAdjoint(checkpoint_every=k)` (see "
    "`revdiffrax.choose_checkpoint_every`), float64, a coupling closer to 1, or "
    "`diffrax.RecursiveCheckpointAdjoint()`."
)


def report_drift(
    cotangents: PyTree,
    drift: Float[Array, ""],
    drift_tol: float | None,
    drift_callback: Callable[[Array], Any] | None,
) -> PyTree:
    """Hand `drift` to the callback, and attach the `drift_tol` check to every
    cotangent, so that it survives whichever of them are used."""
    if drift_callback is not None:
        jax.debug.callback(drift_callback, drift)
    if drift_tol is None:
        return cotangents
    # `not (drift <= tol)` also fires on a NaN drift (an overflowing reconstruction).
    return eqx.error_if(
        cotangents,
        jnp.logical_not(drift <= drift_tol),
        _DRIFT_MESSAGE.format(tol=drift_tol),
    )
