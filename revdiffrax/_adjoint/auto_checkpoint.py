r"""`checkpoint_every="auto"`: the segment length k from the horizon law, at trace
time, with no extra run.

The backward pass of [`revdiffrax.Reversible`][] rebuilds
$y_n = (y_{n+1} - (1 - \lambda) z_n - \Psi_h(t_n, z_n)) / \lambda$, so an error in
$y_{n+1}$ reaches $y_n$ multiplied by $1/\lambda$. Every reconstructed step also
makes a fresh rounding error of about $\varepsilon \|y\|$ ($\varepsilon$ the machine
epsilon of the state's dtype). Modelling these as independent, the error after
rebuilding $k$ steps from a stored state is

$$\text{drift}(k) \approx \varepsilon \sqrt{S(k)},\qquad
  S(k) = \sum_{j=0}^{k-1} \lambda^{-2j} = \frac{\lambda^{-2k} - 1}{\lambda^{-2} - 1},$$

$\varepsilon\sqrt{k}$ while $k(1 - \lambda) \ll 1$ and
$\varepsilon\, e^{k(1 - \lambda)} / \sqrt{2(1 - \lambda)}$ beyond: the horizon law.
Solvers without a coupling (`ReversibleHeun`, the leapfrogs, `SymmetricComposition`)
follow the same law with $\lambda = 1$: $\varepsilon \sqrt{k}$.

`"auto"` takes the largest k with `SAFETY * drift(k) <= tol` (`tol` the numeric
`drift_tol`, else the warning threshold $\sqrt{\varepsilon}$); the safety factor
covers a modest problem-dependent error growth (its Jacobian along the
reconstruction), measured at 1x-8x on the white dwarf and issue 24's Kuramoto runs.
A dissipative problem's contraction (rate $\rho$) amplifies the reconstruction by
$e^{h\rho}$ per step, which $1/\lambda$ bounds exactly when the coupling is in the
stability strip $h\rho \le -\ln\lambda$; outside it the parasitic mode grows and
the `ParasiticModeWarning` and drift checks warn at run time (see "The horizon
law" in the docs). A chaotic problem grows errors at its Lyapunov exponent, which
"auto" does not bound: measure with [`revdiffrax.choose_checkpoint_every`][] and
keep the drift warning.
Storage is `max_steps // k` states: the number of accepted steps is only known at
run time.
"""

import math
from typing import Any

import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np


# Covers the problem-dependent error growth the law leaves out (see above).
SAFETY = 10.0


def rounding_growth(coupling: float, k: int) -> float:
    r"""$\sqrt{S(k)}$: the factor by which `k` reconstructed steps multiply one
    step's rounding error, for independent errors amplified by $1/\lambda$ per step."""
    if coupling == 1:
        return math.sqrt(k)
    r = coupling**-2
    return math.sqrt((r**k - 1) / (r - 1))


def auto_segment(coupling: float, eps: float, tol: float) -> int:
    r"""The largest $k \ge 1$ with `SAFETY * eps * rounding_growth(coupling, k) <=
    tol`."""
    budget = (tol / (SAFETY * eps)) ** 2  # the largest admissible S(k)
    if coupling == 1:
        k = math.floor(budget)
    else:
        r = coupling**-2
        k = math.floor(math.log1p(budget * (r - 1)) / math.log(r))
    return max(k, 1)


def solver_coupling(solver: Any) -> float:
    """The coupling of a `Reversible` solver; 1 for solvers without one."""
    from .._solver import Reversible  # a cycle at import time otherwise

    if not isinstance(solver, Reversible):
        return 1.0
    try:
        return float(solver.coupling)
    except Exception as e:  # a traced coupling: no value at trace time
        raise ValueError(
            '`ReversibleAdjoint(checkpoint_every="auto")` reads the coupling of '
            "`revdiffrax.Reversible` at trace time, but it is a traced value "
            f"({solver.coupling!r}). Pass a Python float as the coupling, or an int "
            "`checkpoint_every`."
        ) from e


def state_eps(y0: Any) -> float:
    """The machine epsilon of the least precise inexact leaf of the state."""
    dtypes = [
        jnp.result_type(x)
        for x in jtu.tree_leaves(y0)
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    ]
    if not dtypes:
        return float(np.finfo(jnp.result_type(float)).eps)
    return max(float(np.finfo(d).eps) for d in dtypes)


def resolve_checkpoint_every(
    *,
    y0: Any,
    solver: Any,
    max_steps: int,
    drift_tol: float | str | None,
) -> int | None:
    """The `checkpoint_every` of `"auto"`: `None` when one segment covers all
    `max_steps` steps, else the segment length of the horizon law."""
    eps = state_eps(y0)
    tol = float(drift_tol) if isinstance(drift_tol, (int, float)) else math.sqrt(eps)
    k = auto_segment(solver_coupling(solver), eps, tol)
    return None if k >= max_steps else k
