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
adaptive steps the controller already sees its growth (`Reversible`'s error
estimate); with constant steps only this check does.
"""

from typing import Any, Literal

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Float, PyTree

from .drift import on_host_if, Raise, relative_drift, WarnOnce


AUTO_PARASITIC_TOL = 1e-3


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
    "to bound the reconstruction error that a smaller coupling amplifies; or use "
    "an adaptive step size controller (whose error estimate sees the mode), or a "
    "smaller step."
)
_WARNING = (
    "ReversibleAdjoint: the two states of the reversible solver ended a relative "
    "{offset:.2e} apart (above {tol:.1e}): its parasitic mode grew, and the solution "
    "may be off from the base solver's by about as much. " + _ADVICE + " Pass "
    "`parasitic_tol=<float>` to raise an error instead, or `parasitic_tol=None` to "
    "switch this check off. (Shown once per compilation.)"
)
_ERROR = (
    "ReversibleAdjoint: the two states of the reversible solver ended a relative "
    "{offset:.2e} apart, above parasitic_tol={tol}: its parasitic mode grew, and the "
    "solution is off from the base solver's by about as much. " + _ADVICE
)


def parasitic_offset(solver: Any, y: PyTree, solver_state: PyTree) -> Any:
    """`sol.stats["parasitic_offset"]`, or None for solvers without a second
    state."""
    z = solver.second_state(y, solver_state)
    if z is None:
        return None
    return lax.stop_gradient(relative_drift(z, y))


def check_parasitic(
    outputs: PyTree,
    offset: Float[Array, ""],
    parasitic_tol: float | Literal["auto"] | None,
) -> PyTree:
    """Warn (`"auto"`) or raise (a float) on the host when `offset` exceeds the
    tolerance.

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
        tol = AUTO_PARASITIC_TOL
        report = WarnOnce(
            tol,
            ParasiticModeWarning,
            lambda worst: _WARNING.format(offset=worst, tol=tol),
        )
    else:
        tol = float(parasitic_tol)
        report = Raise(lambda worst: _ERROR.format(offset=worst, tol=tol))
    return _checked(outputs, offset, tol, report)


@eqx.filter_custom_jvp
def _checked(outputs, offset, tol, report):
    zero = on_host_if(jnp.zeros((), offset.dtype), offset, tol, report)

    def add(x):
        # To one element only: an update in place, so that the check costs O(1)
        # whatever the size of the outputs (e.g. 1,000 `SaveAt(ts)` states).
        if eqx.is_inexact_array(x) and x.size > 0:
            return x.at[(0,) * x.ndim].add(zero.astype(x.dtype))
        return x

    return jtu.tree_map(add, outputs)


@_checked.def_jvp
def _checked_jvp(primals, tangents):
    outputs, offset, tol, report = primals
    outputs_dot, _, _, _ = tangents
    return _checked(outputs, offset, tol, report), outputs_dot
