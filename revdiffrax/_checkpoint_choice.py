import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import ArrayLike, PyTree

from ._adjoint import ReversibleAdjoint


@dataclasses.dataclass(frozen=True)
class CheckpointChoice:
    """One row of [`revdiffrax.choose_checkpoint_every`][]'s report.

    **Attributes:**

    - `checkpoint_every`: the value of `ReversibleAdjoint(checkpoint_every=...)`.
    - `drift`: the largest relative reconstruction error of the solution over the
        segments between checkpoints (see `ReversibleAdjoint(drift_callback=...)`).
    - `temp_bytes`: compiled temporary memory of the gradient computation, from
        `memory_analysis()` of the compiled function; `None` where the backend does
        not report it.
    - `seconds`: wall time of one gradient evaluation after compilation.
    """

    checkpoint_every: int | None
    drift: float
    temp_bytes: int | None
    seconds: float


def _float_eps(tree) -> float:
    dtypes = [
        jnp.result_type(x)
        for x in jax.tree_util.tree_leaves(tree)
        if eqx.is_inexact_array(x)
    ]
    if not dtypes:
        dtypes = [jnp.result_type(float)]
    # The least precise floating type used decides the achievable accuracy.
    return max(float(jnp.finfo(d).eps) for d in dtypes)


def _default_drift_tol(tree) -> float:
    return 100 * _float_eps(tree)


def _pick(drifts: dict, drift_tol: float) -> tuple[int | None, bool]:
    """The rule of `choose_checkpoint_every`: from `{k: drift}`, the largest k (the
    least memory; `None` counts as infinite) with drift <= `drift_tol`, else the k
    with the smallest drift (ties: the larger k). Also returns whether the chosen k
    met the tolerance. A NaN drift counts as infinite."""

    def size(k):
        return math.inf if k is None else k

    def drift(k):
        d = drifts[k]
        return math.inf if math.isnan(d) else d

    safe = [k for k in drifts if drift(k) <= drift_tol]
    if safe:
        return max(safe, key=size), True
    return min(drifts, key=lambda k: (drift(k), -size(k))), False


def choose_checkpoint_every(
    loss: Callable[..., ArrayLike],
    *args: PyTree[Any],
    candidates: Sequence[int | None] = (None, 1000, 100, 10),
    drift_tol: float | None = None,
    verbose: bool = True,
) -> tuple[int | None, list[CheckpointChoice]]:
    r"""Measure reconstruction drift, memory and time of a gradient for several
    values of `ReversibleAdjoint(checkpoint_every=k)` and pick the cheapest safe one.

    Reconstructing the forward solve backwards amplifies rounding errors (by about
    `1/coupling` per step for [`revdiffrax.Reversible`][], more on chaotic
    problems). Storing the solver state every k steps caps the amplification at k
    steps for `max_steps // k` stored states. This runs one gradient of `loss` per
    candidate and returns the largest k (the least memory; `None` counts as
    infinite) whose drift is at most `drift_tol`, falling back to the candidate with
    the smallest drift when none qualifies.

    The drift is the relative reconstruction error of the solution, so a gradient
    computed from a reconstruction with drift $\delta$ has a relative error of
    roughly $\delta$ times the sensitivity of the loss. The default tolerance,
    `100 * eps` of the floating type of `args` (about `1.2e-5` in float32,
    `2.2e-14` in float64), keeps that error at the level of the forward solve's own
    rounding errors.

    Call it once on a representative batch (e.g. before training): the drift depends
    on the problem, the step sizes, the coupling and the floating-point type, not on
    the parameter values in any sharp way.

    **Arguments:**

    - `loss`: a function `loss(adjoint, *args) -> scalar` that calls
        `diffrax.diffeqsolve(..., adjoint=adjoint)`.
    - `*args`: the arguments of `loss`; the gradient is taken with respect to all of
        their floating-point arrays.
    - `candidates`: the values of `checkpoint_every` to try.
    - `drift_tol`: the largest acceptable drift; defaults to `100 * eps`.
    - `verbose`: print a table of the measurements.

    **Returns:**

    A pair `(k, rows)`: the chosen `checkpoint_every`, and one
    [`revdiffrax.CheckpointChoice`][] per candidate.
    """
    candidates = list(candidates)
    if len(candidates) == 0:
        raise ValueError("`candidates` must contain at least one value of k.")
    if drift_tol is None:
        drift_tol = _default_drift_tol(args)
    from ._adjoint_choice import measure

    diff, static = eqx.partition(args, eqx.is_inexact_array)
    rows = []
    for k in candidates:
        # The drift is measured here, so the default drift warning is switched off.
        adjoint = ReversibleAdjoint(checkpoint_every=k, drift_tol=None)
        row = measure(loss, str(k), adjoint, diff, static, None, 1, math.inf)
        assert row.seconds is not None  # no budget: every candidate runs
        rows.append(CheckpointChoice(k, row.drift, row.temp_bytes, row.seconds))

    chosen, safe = _pick({row.checkpoint_every: row.drift for row in rows}, drift_tol)
    choice = next(row for row in rows if row.checkpoint_every == chosen)
    if verbose:
        print(
            "checkpoint_every | drift    | temp memory | time "
            f"(drift tol {drift_tol:.1e})"
        )
        for row in rows:
            mem = "n/a"
            if row.temp_bytes is not None:
                mem = f"{row.temp_bytes / 2**20:.2f} MiB"
            mark = "  <- chosen" if row is choice else ""
            print(
                f"{str(row.checkpoint_every):>16} | {row.drift:.2e} | {mem:>11} | "
                f"{1e3 * row.seconds:7.2f} ms{mark}"
            )
        if not safe:
            print(
                "No candidate reached the drift tolerance: try smaller values of "
                "`checkpoint_every`, float64, or a coupling closer to 1."
            )
    return choice.checkpoint_every, rows
