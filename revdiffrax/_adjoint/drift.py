"""The reconstruction drift: how far the backward pass's rebuilt states are from the
states of the forward pass, measured where both are known (`y0`, checkpoints)."""

import warnings
from collections.abc import Callable
from typing import Any, Literal

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, Float, PyTree

from .._varying import match_varying, varying_axes
from .measured import select


def relative_drift(
    y_rec: PyTree[Array],
    y_true: PyTree[Array],
    measured: tuple[bool, ...] | None = None,
) -> Float[Array, ""]:
    """Relative 2-norm error $\\|y_{rec} - y\\|_2 / \\|y\\|_2$ (absolute if y = 0),
    over the leaves that `measured` marks (`measured.py`; None: all of them)."""
    leaves_rec = select(y_rec, measured)
    leaves_true = select(y_true, measured)
    err = sum(jnp.sum(jnp.abs(a - b) ** 2) for a, b in zip(leaves_rec, leaves_true))
    size = sum(jnp.sum(jnp.abs(b) ** 2) for b in leaves_true)
    err = jnp.sqrt(err)
    size = jnp.sqrt(size)
    return jnp.where(size > 0, err / jnp.where(size > 0, size, 1), err)


class DriftWarning(UserWarning):
    """Issued by [`revdiffrax.ReversibleAdjoint`][] when the backward pass rebuilt the
    solve with a large relative error, so that the gradient may be inaccurate.

    Silence it with `ReversibleAdjoint(drift_tol=None)`, or with
    `warnings.simplefilter("ignore", revdiffrax.DriftWarning)`; turn it into an error
    with `ReversibleAdjoint(drift_tol=tol)`.
    """


_ADVICE = (
    "Use `ReversibleAdjoint(checkpoint_every=k)` (see "
    "`revdiffrax.choose_checkpoint_every`), float64, a coupling closer to 1, or "
    "`diffrax.RecursiveCheckpointAdjoint()`."
)
_DRIFT_MESSAGE = (
    "ReversibleAdjoint: the backward pass reconstructed the solution with a "
    "relative error above drift_tol={tol}, so the gradient is inaccurate. " + _ADVICE
)
_WARNING_MESSAGE = (
    "ReversibleAdjoint: the backward pass reconstructed the solution with a "
    "relative error of {drift:.2e}, above {tol:.1e} (the square root of {dtype}'s "
    "machine epsilon), so the gradient may be inaccurate. " + _ADVICE + " Pass "
    "`drift_tol=<float>` to raise an error instead, or `drift_tol=None` to switch "
    "this check off. (Shown once per compilation.)"
)


def auto_drift_tol(dtype: Any) -> float:
    """The default warning threshold: half the digits of `dtype` lost."""
    return float(np.sqrt(np.finfo(dtype).eps))


def _worst(values: np.ndarray) -> float:
    """The largest value, a NaN counting as infinite."""
    return float(np.max(np.where(np.isnan(values), np.inf, values)))


class WarnOnce:
    """A host-side identity on `tree` that issues `category(message(worst))` the
    first time it sees a value above `tol`. One is made per trace, so the warning
    appears once per compilation."""

    def __init__(
        self, tol: float, category: type[Warning], message: Callable[[float], str]
    ):
        self.tol = tol
        self.category = category
        self.message = message
        self.warned = False

    def __call__(self, tree: PyTree, values: np.ndarray) -> PyTree:
        worst = _worst(values)
        if not self.warned and worst > self.tol:
            self.warned = True
            warnings.warn(self.message(worst), self.category, stacklevel=2)
        return tree


class Raise:
    """A host-side check that raises `RuntimeError(message(worst))`; called by
    `on_host_if` only when a value is above the tolerance."""

    def __init__(self, message: Callable[[float], str]):
        self.message = message

    def __call__(self, tree: PyTree, values: np.ndarray) -> PyTree:
        del tree
        raise RuntimeError(self.message(_worst(values)))


def on_host_if(
    cotangents: PyTree,
    drift: Float[Array, ""],
    tol: float,
    check: Callable,
    values: Array | None = None,
) -> PyTree:
    """`_on_host_if`, whose tangents (under forward-over-reverse differentiation:
    a callback has no JVP) are those of `cotangents`: the check runs on the primal
    values."""
    return _on_host_if(cotangents, drift, values, tol=tol, check=check)


@eqx.filter_custom_jvp
def _on_host_if(
    cotangents: PyTree,
    drift: Float[Array, ""],
    values: Array | None,
    *,
    tol: float,
    check: Callable,
) -> PyTree:
    """Pass the cotangents through the host callback `check(cotangents, values)`
    (`values` defaults to the drift), when the drift is above `tol` (or NaN). As in
    `equinox.error_if`: a `pure_callback` under a `cond` whose output the
    cotangents depend on, so that it runs whichever cotangents are used, and costs
    nothing when it is not taken (a `debug.callback`, which has side effects, costs
    a host synchronisation on every call)."""
    # `unvmap_any`: under `vmap`, one `cond` for the batch, not a `select`.
    pred = eqxi.unvmap_any(jnp.logical_not(drift <= tol))

    def handle(cotangents_, values_):
        struct = jax.eval_shape(lambda: cotangents_)
        out = jax.pure_callback(
            check, struct, cotangents_, values_, vmap_method="broadcast_all"
        )
        # Inside `jax.shard_map`, a callback's outputs are typed as replicated.
        return match_varying(out, cotangents_)

    values = drift if values is None else values
    return lax.cond(pred, handle, lambda c, _: c, cotangents, values)


@_on_host_if.def_jvp
def _on_host_if_jvp(primals, tangents, *, tol: float, check: Callable):
    (cotangents, drift, values), (cotangents_dot, _, _) = primals, tangents
    out = _on_host_if(cotangents, drift, values, tol=tol, check=check)
    return out, cotangents_dot


def _warn_if_large(cotangents: PyTree, drift: Float[Array, ""]) -> PyTree:
    """Warn (once per compilation) when the drift is large."""
    tol = auto_drift_tol(drift.dtype)
    dtype = np.dtype(drift.dtype).name

    def message(worst: float) -> str:
        return _WARNING_MESSAGE.format(drift=worst, tol=tol, dtype=dtype)

    report = WarnOnce(tol, DriftWarning, message)
    return _depend_on(
        cotangents, on_host_if(jnp.zeros((), drift.dtype), drift, tol, report)
    )


def _depend_on(cotangents: PyTree, zero: Float[Array, ""]) -> PyTree:
    """The cotangents, each floating-point one made to depend on `zero` (the output
    of the check), so that the check runs whichever of them are used. `zero` is
    added to one element, in place: passing the cotangents themselves through the
    check's `cond` would copy them, and under `jax.vmap` of per-sample solves they
    include one cotangent of the parameters per sample (e.g. 2.4 MB for a batch of
    256 solves of a 1,348-parameter MLP, 75% of the gradient's temp memory)."""

    def add(x):
        if eqx.is_inexact_array(x) and x.size > 0:
            return x.at[(0,) * x.ndim].add(zero.astype(x.dtype))
        return x

    return jtu.tree_map(add, cotangents)


def _raise_if_large(
    cotangents: PyTree, drift: Float[Array, ""], drift_tol: float
) -> PyTree:
    """Raise an error when the drift exceeds `drift_tol`: `equinox.error_if`, except
    inside `jax.shard_map`, whose types equinox 0.13's `error_if` does not keep (its
    callback returns replicated values), where a callback that raises is used."""
    message = _DRIFT_MESSAGE.format(tol=drift_tol)
    # `not (drift <= tol)` also fires on a NaN drift (an overflowing reconstruction).
    if not varying_axes(cotangents):
        return eqx.error_if(cotangents, jnp.logical_not(drift <= drift_tol), message)
    return on_host_if(cotangents, drift, drift_tol, Raise(lambda _: message))


def report_drift(
    cotangents: PyTree,
    drift: Float[Array, ""],
    drift_tol: float | Literal["auto"] | None,
    drift_callback: Callable[[Array], Any] | None,
) -> PyTree:
    """Hand `drift` to the callback, then check it: `"auto"` warns above the square
    root of the machine epsilon, a float raises above it (attached to every
    cotangent, so that the check survives whichever of them are used), `None` does
    nothing."""
    if drift_callback is not None:
        jax.debug.callback(drift_callback, drift)
    if drift_tol is None:
        return cotangents
    if isinstance(drift_tol, str):
        return _warn_if_large(cotangents, drift)
    return _raise_if_large(cotangents, drift, drift_tol)
