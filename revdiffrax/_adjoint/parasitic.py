r"""The parasitic mode of a two-state reversible solver, reported after the forward
solve: the relative distance between its two states at the end,
$\|y_N - z_N\|_2 / \|y_N\|_2$ (`sol.stats["parasitic_offset"]`), and a check on it.

For [`revdiffrax.Reversible`][], $d_n = y_n - z_n$ is multiplied by about
$\lambda e^{-ha}$ per step on an eigenvalue $a$ of the Jacobian, so it grows
geometrically on dissipative problems with $h\,|\mathrm{Re}\,a| > -\ln\lambda$, and
every step feeds $(\lambda - 1 - hJ) d_n$ into $y$. Where it grows, the error it
has caused in $y$ is about $d_N$ (the sum of $h|a| d_n$ over a geometric
sequence); where it does not, $d_N$ is about the accumulated local defects of the
base solver. Either way it measures how far the coupled solution may be from the
base solver's, at no cost: both states are in the final solver state. With
adaptive steps the threshold is relative to the controller's tolerances and the
number of steps (`auto_parasitic_threshold`); `Reversible(...,
parasitic_error=True)` makes the controller itself see the mode's growth.
"""

import warnings
from typing import Any, Literal

import diffrax
import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, PyTree

from .drift import on_host_if, Raise, relative_drift
from .measured import select


AUTO_PARASITIC_TOL = 1e-3
# With an adaptive controller, the default threshold is this many times what the
# local errors allowed over the solve add up to (see `auto_parasitic_threshold`).
TOLERANCE_FACTOR = 10.0


class ParasiticModeWarning(UserWarning):
    """Issued by [`revdiffrax.ReversibleAdjoint`][] after a forward solve whose two
    reversible states ended far apart (`sol.stats["parasitic_offset"]` above
    `parasitic_tol`): the parasitic mode of the coupled scheme grew, and the
    solution is off from the base solver's by about that relative amount.

    Silence it with `ReversibleAdjoint(parasitic_tol=None)` or
    `warnings.simplefilter("ignore", revdiffrax.ParasiticModeWarning)`; turn it into
    an error with `ReversibleAdjoint(parasitic_tol=tol)`.
    """


_ADVICE = (
    "On a dissipative problem, lower the coupling towards exp(-h * rate) for the "
    "step h and the fastest decay rate (e.g. `Reversible(solver, coupling=0.9)` "
    "for h * rate = 0.1), together with `ReversibleAdjoint(checkpoint_every=k)` "
    "to bound the reconstruction error that a smaller coupling amplifies; or a "
    "smaller step, or an adaptive step size controller with "
    "`Reversible(solver, parasitic_error=True)` (whose error estimate sees the "
    "mode)."
)
_WARNING = (
    "ReversibleAdjoint: the two states of the reversible solver ended a relative "
    "{offset:.2e} apart (above {tol:.1e}{why}): its parasitic mode grew, and the "
    "solution "
    "may be off from the base solver's by about as much. " + _ADVICE + " Pass "
    "`parasitic_tol=<float>` to raise an error instead, or `parasitic_tol=None` to "
    "switch this check off. (Shown once per compilation.)"
)
_ERROR = (
    "ReversibleAdjoint: the two states of the reversible solver ended a relative "
    "{offset:.2e} apart, above parasitic_tol={tol}: its parasitic mode grew, and the "
    "solution is off from the base solver's by about as much. " + _ADVICE
)


def parasitic_offset(
    solver: Any,
    y: PyTree,
    solver_state: PyTree,
    measured: tuple[bool, ...] | None = None,
) -> Any:
    """`sol.stats["parasitic_offset"]`, over the leaves that `measured` marks
    (`measured.py`: those a vector field reads; None: all), or None for solvers
    without a second state."""
    z = solver.second_state(y, solver_state)
    if z is None:
        return None
    return lax.stop_gradient(relative_drift(z, y, measured))


def auto_parasitic_threshold(
    controller: diffrax.AbstractStepSizeController,
    y: PyTree,
    num_steps: Int[ArrayLike, ""],
    measured: tuple[bool, ...] | None = None,
) -> Float[Array, ""] | float:
    r"""The offset above which `parasitic_tol="auto"` warns.

    With constant steps nothing says which accuracy was wanted, and the threshold is
    $10^{-3}$. With an adaptive controller of tolerances `rtol`, `atol` over $N$
    accepted steps, each step's local error is held below the tolerance, and so is
    each of the local defects that the offset $y_N - z_N$ accumulates where the
    parasitic mode does not grow (`Reversible`'s error estimate covers both of its
    base steps): such an offset stays below about $N$ tolerances, like the base
    solver's own global error, and is harmless. An offset ten times larger than
    that cannot be an accumulation of allowed local errors: the mode grew. The
    threshold, relative to $\|y_N\|_2$ like the offset, is

    $$10\,N\,\big(\text{rtol} + \text{atol}\sqrt{n}\,/\,\|y_N\|_2\big),$$

    ($n$ the number of components), but at least $100\epsilon$ of the dtype; $y_N$
    and $n$ over the leaves that `measured` marks, as the offset is.
    """
    rtol = getattr(controller, "rtol", None)
    atol = getattr(controller, "atol", None)
    if (
        not isinstance(controller, diffrax.AbstractAdaptiveStepSizeController)
        or not isinstance(rtol, (int, float))
        or not isinstance(atol, (int, float))
    ):
        return AUTO_PARASITIC_TOL
    leaves = [x for x in select(y, measured) if eqx.is_inexact_array(x)]
    size = sum(x.size for x in leaves)
    norm = jnp.sqrt(sum(jnp.sum(jnp.abs(x) ** 2) for x in leaves))
    eps = float(np.finfo(jnp.result_type(*leaves)).eps)
    relative_atol = jnp.where(
        norm > 0, atol * np.sqrt(size) / jnp.where(norm > 0, norm, 1), jnp.inf
    )
    tolerance = TOLERANCE_FACTOR * jnp.maximum(num_steps, 1) * (rtol + relative_atol)
    return lax.stop_gradient(jnp.maximum(tolerance, 100 * eps))


class _WarnOnce:
    """A host-side identity that issues a `ParasiticModeWarning` the first time it
    sees an offset above its threshold. Its values are `(offset / threshold,
    offset, threshold)` (with leading batch axes under `jax.vmap`). One is made per
    trace, so the warning appears once per compilation."""

    def __init__(self, adaptive: bool):
        self.adaptive = adaptive
        self.warned = False

    def __call__(self, tree: PyTree, values: np.ndarray) -> PyTree:
        values = np.asarray(values).reshape(-1, 3)
        ratios = np.where(np.isnan(values[:, 0]), np.inf, values[:, 0])
        worst = int(np.argmax(ratios))
        if not self.warned and ratios[worst] > 1:
            self.warned = True
            why = (
                f", {TOLERANCE_FACTOR:g} times the local errors the step size "
                "controller allowed over the solve"
                if self.adaptive
                else ""
            )
            message = _WARNING.format(
                offset=values[worst, 1], tol=values[worst, 2], why=why
            )
            warnings.warn(message, ParasiticModeWarning, stacklevel=2)
        return tree


def check_parasitic(
    outputs: PyTree,
    offset: Float[Array, ""],
    parasitic_tol: float | Literal["auto"] | None,
    threshold: Float[Array, ""] | float = AUTO_PARASITIC_TOL,
) -> PyTree:
    """Warn (`"auto"`, above `threshold`: see `auto_parasitic_threshold`) or raise (a
    float) on the host when `offset` exceeds the tolerance.

    The host callback sits under a `cond` taken only then (`drift.on_host_if`), so
    that a solve within tolerance costs one comparison. It returns a zero that is
    added to the first element of every floating-point output of the solve (e.g.
    `ys`): a dependency that keeps it from being removed as unused (passing the
    outputs themselves through it would copy them), behind a `custom_jvp` that
    passes tangents through, so that forward-mode differentiation reaches
    `ReversibleAdjoint`'s own rules."""
    if parasitic_tol is None:
        return outputs
    if isinstance(parasitic_tol, str):
        report = _WarnOnce(adaptive=not isinstance(threshold, float))
        threshold = jnp.asarray(threshold, offset.dtype)
        ratio = offset / threshold
        values = jnp.stack([ratio, offset, threshold])
        return _checked(outputs, ratio, 1.0, report, values)
    tol = float(parasitic_tol)
    report = Raise(lambda worst: _ERROR.format(offset=worst, tol=tol))
    return _checked(outputs, offset, tol, report, offset)


@eqx.filter_custom_jvp
def _checked(outputs, measure, tol, report, values):
    zero = on_host_if(jnp.zeros((), measure.dtype), measure, tol, report, values)

    def add(x):
        # To one element only: an update in place, so that the check costs O(1)
        # whatever the size of the outputs (e.g. 1,000 `SaveAt(ts)` states).
        if eqx.is_inexact_array(x) and x.size > 0:
            return x.at[(0,) * x.ndim].add(zero.astype(x.dtype))
        return x

    return jtu.tree_map(add, outputs)


@_checked.def_jvp
def _checked_jvp(primals, tangents):
    outputs, measure, tol, report, values = primals
    outputs_dot = tangents[0]
    return _checked(outputs, measure, tol, report, values), outputs_dot
