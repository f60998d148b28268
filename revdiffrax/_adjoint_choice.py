import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import diffrax
import equinox as eqx
import jax
import numpy as np
from jaxtyping import ArrayLike, PyTree

from ._adjoint import ReversibleAdjoint


@dataclasses.dataclass(frozen=True)
class AdjointChoice:
    """One row of [`revdiffrax.choose_adjoint`][]'s report.

    **Attributes:**

    - `label`: a short name, e.g. `"RCA(8)"` or `"reversible k=100"`.
    - `adjoint`: the candidate adjoint.
    - `temp_bytes`: compiled temporary memory of the gradient
        (`memory_analysis().temp_size_in_bytes`); `None` where the backend does not
        report it.
    - `seconds`: median wall time of one gradient after compilation; `None` if the
        candidate was not run (its memory exceeded the budget).
    - `drift`: for reversible candidates, the largest relative reconstruction error
        of the backward pass; 0 for the others.
    - `eligible`: within the memory budget and, for reversible candidates, the drift
        tolerance.
    """

    label: str
    adjoint: diffrax.AbstractAdjoint
    temp_bytes: int | None
    seconds: float | None
    drift: float
    eligible: bool


def default_candidates(
    num_steps: int | None,
) -> dict[str, diffrax.AbstractAdjoint]:
    """Every exact adjoint a diffrax user could pick: checkpointing with few to all
    checkpoints, storing everything, and reversible with and without checkpoints."""
    out: dict[str, diffrax.AbstractAdjoint] = {}
    counts: list[int | None] = [2, 4, 8, 16]
    if num_steps is None:
        counts.append(None)  # diffrax's default, log(max_steps)
    else:
        counts += [math.floor(math.sqrt(2 * num_steps)), num_steps]
    for c in dict.fromkeys(counts):
        out[f"RCA({c})"] = diffrax.RecursiveCheckpointAdjoint(checkpoints=c)
    out["Direct"] = diffrax.DirectAdjoint()
    for k in (None, 100, 10):
        label = "reversible" if k is None else f"reversible k={k}"
        # The drift is measured here, so the default warning is switched off.
        out[label] = ReversibleAdjoint(checkpoint_every=k, drift_tol=None)
    return out


def _compile(loss, adjoint, diff, static):
    def grad_fn(_diff):
        return jax.grad(lambda d: loss(adjoint, *eqx.combine(d, static)))(_diff)

    compiled = jax.jit(grad_fn).lower(diff).compile()
    analysis = compiled.memory_analysis()
    temp = None if analysis is None else int(analysis.temp_size_in_bytes)
    return compiled, temp


def _time(compiled, diff, repeats: int) -> float:
    jax.block_until_ready(compiled(diff))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(diff))
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _with_drift_callback(adjoint, drifts: list):
    if not isinstance(adjoint, ReversibleAdjoint):
        return adjoint
    return dataclasses.replace(adjoint, drift_callback=drifts.append)


def measure(
    loss: Callable, label: str, adjoint, diff, static, budget, repeats, drift_tol
) -> AdjointChoice:
    """Compile the gradient of `loss` with `adjoint`, and run it if it fits."""
    drifts: list = []
    compiled, temp = _compile(loss, _with_drift_callback(adjoint, drifts), diff, static)
    fits = budget is None or (temp is not None and temp <= budget)
    if not fits:
        return AdjointChoice(label, adjoint, temp, None, 0.0, False)
    seconds = _time(compiled, diff, repeats)
    jax.effects_barrier()
    drift = max((float(np.max(np.asarray(d))) for d in drifts), default=0.0)
    drift = math.inf if math.isnan(drift) else drift
    return AdjointChoice(label, adjoint, temp, seconds, drift, drift <= drift_tol)


def pick_fastest(rows: Sequence[AdjointChoice]) -> AdjointChoice | None:
    """The fastest eligible row (ties: the smaller memory), or None."""
    ok = [r for r in rows if r.eligible and r.seconds is not None]
    if not ok:
        return None
    return min(ok, key=lambda r: (r.seconds, r.temp_bytes or 0))


def _report(rows: Sequence[AdjointChoice], chosen, budget) -> None:
    limit = "none" if budget is None else f"{budget / 2**20:.2f} MiB"
    print(
        f"adjoint              | temp memory |    time    | drift    (budget {limit})"
    )
    for r in rows:
        mem = "n/a" if r.temp_bytes is None else f"{r.temp_bytes / 2**20:.2f} MiB"
        secs = "not run" if r.seconds is None else f"{1e3 * r.seconds:.2f} ms"
        note = "  <- chosen" if r is chosen else ("" if r.eligible else "  (excluded)")
        print(f"{r.label:<20} | {mem:>11} | {secs:>10} | {r.drift:.1e}{note}")


def choose_adjoint(
    loss: Callable[..., ArrayLike],
    *args: PyTree[Any],
    memory_budget: int | None = None,
    num_steps: int | None = None,
    candidates: dict[str, diffrax.AbstractAdjoint] | None = None,
    drift_tol: float | None = None,
    repeats: int = 3,
    verbose: bool = True,
) -> tuple[diffrax.AbstractAdjoint, list[AdjointChoice]]:
    """Measure every exact adjoint on your own loss and return the fastest whose
    compiled memory fits the budget.

    Each candidate's gradient is compiled and its temporary memory read from
    `memory_analysis()`; those that fit `memory_budget` are run (the median of
    `repeats` calls after a warm-up), and reversible candidates must also rebuild the
    forward solve with a relative drift at most `drift_tol` (as in
    [`revdiffrax.choose_checkpoint_every`][], which this extends to every adjoint).
    Measure on a representative batch, once, before training.

    **Arguments:**

    - `loss`: a function `loss(adjoint, *args) -> scalar` that calls
        `diffrax.diffeqsolve(..., adjoint=adjoint)`. Give checkpointing the base
        solver and the reversible adjoint the reversible one, e.g.
        `solver = revdiffrax.Reversible(base) if isinstance(adjoint,
        revdiffrax.ReversibleAdjoint) else base`.
    - `*args`: the arguments of `loss`; the gradient is taken with respect to all of
        their floating-point arrays.
    - `memory_budget`: the most temporary memory, in bytes, that the gradient may
        use; `None` for no limit.
    - `num_steps`: the number of steps of the solve, if known: adds checkpointing
        with `floor(sqrt(2 num_steps))` and `num_steps` (every state) checkpoints.
    - `candidates`: `{label: adjoint}` to try instead of the default (checkpointing
        with 2, 4, 8, 16 and the above checkpoints, `DirectAdjoint`, and
        `ReversibleAdjoint` with `checkpoint_every` None, 100 and 10).
    - `drift_tol`: the largest acceptable drift; defaults to `100 * eps` of the
        floating type of `args`.
    - `repeats`: timed calls per candidate.
    - `verbose`: print the table.

    **Returns:**

    `(adjoint, rows)`: the chosen adjoint and one [`revdiffrax.AdjointChoice`][] per
    candidate. Raises `ValueError` if no candidate fits.
    """
    from ._checkpoint_choice import _default_drift_tol

    if candidates is None:
        candidates = default_candidates(num_steps)
    if drift_tol is None:
        drift_tol = _default_drift_tol(args)
    diff, static = eqx.partition(args, eqx.is_inexact_array)
    rows = [
        measure(loss, label, adj, diff, static, memory_budget, repeats, drift_tol)
        for label, adj in candidates.items()
    ]
    chosen = pick_fastest(rows)
    if verbose:
        _report(rows, chosen, memory_budget)
    if chosen is None:
        smallest = min((r.temp_bytes for r in rows if r.temp_bytes), default=None)
        raise ValueError(
            f"No adjoint fits `memory_budget={memory_budget}` bytes (the smallest "
            f"needs {smallest}) within the drift tolerance {drift_tol:.1e}. Raise the "
            "budget, shrink the batch, or pass `drift_tol`."
        )
    return chosen.adjoint, rows
