"""Base solvers and adjoints of the experiments, by name.

`make_solver("midpoint")` is `revdiffrax.Reversible(diffrax.Midpoint())`;
`make_adjoint("checkpoint", c)` is `diffrax.RecursiveCheckpointAdjoint(c)`. The
published comparison uses floor(sqrt(2N)) checkpoints for N steps
(`sqrt_checkpoints`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import diffrax
import numpy as np
import revdiffrax
from diffrax._local_interpolation import ThirdOrderHermitePolynomialInterpolation


ADJOINTS = ("reversible", "checkpoint", "direct", "backsolve")

_rk4_tableau = diffrax.ButcherTableau(
    a_lower=(np.array([0.5]), np.array([0.0, 0.5]), np.array([0.0, 0.0, 1.0])),
    b_sol=np.array([1 / 6, 1 / 3, 1 / 3, 1 / 6]),
    # Embedded estimate: RK4 minus the midpoint method (b = [0, 1, 0, 0]), which uses
    # the same stages. Only second order: this RK4 is meant for fixed steps.
    b_error=np.array([1 / 6, 1 / 3 - 1, 1 / 3, 1 / 6]),
    c=np.array([0.5, 0.5, 1.0]),
)


class RK4(diffrax.AbstractERK):
    """The classic fourth-order Runge--Kutta method (diffrax does not ship one).

    Has an embedded (second order, midpoint) error estimate, so it is meant for
    fixed step sizes. Third-order Hermite interpolation for dense output.
    """

    tableau: ClassVar[diffrax.ButcherTableau] = _rk4_tableau
    interpolation_cls: ClassVar[Callable[..., Any]] = (
        ThirdOrderHermitePolynomialInterpolation.from_k
    )

    def order(self, terms: Any) -> int:
        del terms
        return 4


SOLVERS: dict[str, Callable[[], diffrax.AbstractSolver]] = {
    "euler": diffrax.Euler,
    "midpoint": diffrax.Midpoint,
    "heun": diffrax.Heun,
    "ralston": diffrax.Ralston,
    "bosh3": diffrax.Bosh3,
    "rk4": RK4,
    "tsit5": diffrax.Tsit5,
    "dopri5": diffrax.Dopri5,
}


def make_solver(
    name: str, *, reversible: bool = True, coupling: float = 0.999, **kwargs
) -> diffrax.AbstractSolver:
    """The base solver `name`, wrapped in `revdiffrax.Reversible` if `reversible`
    (`kwargs`, e.g. `integrated`, go to `Reversible`)."""
    key = name.lower()
    if key not in SOLVERS:
        raise ValueError(f"Unknown solver {name!r}; choose one of {sorted(SOLVERS)}.")
    base = SOLVERS[key]()
    if not reversible:
        return base
    return revdiffrax.Reversible(base, coupling=coupling, **kwargs)


def make_adjoint(name: str, checkpoints: int | None = None) -> diffrax.AbstractAdjoint:
    """The adjoint `name` (one of `ADJOINTS`); `checkpoints` is for "checkpoint"."""
    if name == "reversible":
        return revdiffrax.ReversibleAdjoint()
    if name == "checkpoint":
        return diffrax.RecursiveCheckpointAdjoint(checkpoints=checkpoints)
    if name == "direct":
        return diffrax.DirectAdjoint()
    if name == "backsolve":
        return diffrax.BacksolveAdjoint()
    raise ValueError(f"Unknown adjoint {name!r}; choose one of {list(ADJOINTS)}.")


def sqrt_checkpoints(num_steps: int) -> int:
    """floor(sqrt(2N)): the checkpoint count used by the published comparison."""
    return int(math.floor(math.sqrt(2 * num_steps)))
