"""A training problem: data on a time grid, and how the model is solved against it."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from .model import vector_field


def interpolate_steps(
    sol: diffrax.Solution, y0: jax.Array, query: jax.Array
) -> jax.Array:
    """Linear interpolation onto `query` of a solve saved with `SaveAt(steps=True)`
    from `t0 = query[0]` (where the state is `y0`).

    The step times are treated as constants (diffrax's PID controller does not
    differentiate through step sizes either). Unused entries of the step buffer are
    inf: they are moved past the last query time (keeping the times sorted) with
    finite values, so they never enter the interpolation.
    """
    ts = jnp.concatenate([query[:1], sol.ts])
    ys = jnp.concatenate([y0[None], sol.ys])
    finite = jnp.isfinite(ts)
    beyond = 2 * query[-1] - query[0] + 1
    ts = jax.lax.stop_gradient(jnp.where(finite, ts, beyond))
    ys = jnp.where(finite[:, None], ys, 0.0)
    path = diffrax.LinearInterpolation(ts=ts, ys=ys)
    return jax.vmap(lambda t: path.evaluate(t, left=False))(query)


@dataclasses.dataclass
class Problem:
    """Data `ys` at the times `ts`, and the solver settings to fit them with."""

    name: str
    title: str
    ts: np.ndarray  # save times; ts[0] = t0, ts[-1] = t1
    ys: np.ndarray  # data, shape (len(ts), dim)
    time_dependent: bool
    solver: str  # default base solver
    num_steps: int  # N: fixed steps, or nominal N (for floor(sqrt(2N))) if adaptive
    adaptive: bool = False
    rtol: float = 1e-6
    atol: float = 1e-6
    max_steps: int | None = None  # defaults to num_steps for fixed steps
    state_labels: Sequence[str] = ()
    data_source: str = ""
    iters: int = 1000  # default iterations

    @property
    def dim(self) -> int:
        return self.ys.shape[1]

    def solve(
        self,
        model: Any,
        solver: diffrax.AbstractSolver,
        adjoint: diffrax.AbstractAdjoint,
        saveat: diffrax.SaveAt | None = None,
    ) -> diffrax.Solution:
        """Solve with `model` as vector field, saving every step (`SaveAt(steps=True)`).

        Every step is saved rather than using `SaveAt(ts=...)`: with diffrax 0.7.2,
        `RecursiveCheckpointAdjoint` gives wrong gradients (relative errors up to
        ~1e-2) with `SaveAt(ts=...)` for many checkpoint counts (including the
        default), while with `SaveAt(steps=True)` it matches `DirectAdjoint` to
        rounding error (see `python -m experiments.check_gradients`).
        """
        t0, t1 = float(self.ts[0]), float(self.ts[-1])
        if self.adaptive:
            controller = diffrax.PIDController(rtol=self.rtol, atol=self.atol)
            dt0 = float(self.ts[1] - self.ts[0])
        else:
            controller = diffrax.ConstantStepSize()
            dt0 = (t1 - t0) / self.num_steps
        return diffrax.diffeqsolve(
            diffrax.ODETerm(vector_field),
            solver,
            t0,
            t1,
            dt0,
            jnp.asarray(self.ys[0]),
            args=model,
            saveat=saveat or diffrax.SaveAt(steps=True),
            stepsize_controller=controller,
            adjoint=adjoint,
            max_steps=self.max_steps or self.num_steps,
        )

    def predict(
        self,
        model: Any,
        solver: diffrax.AbstractSolver,
        adjoint: diffrax.AbstractAdjoint,
    ) -> tuple[jax.Array, jax.Array]:
        """The model's trajectory at the data times `ts`, and the number of steps.

        Fixed steps land on `ts`, so the saved steps are the prediction. Adaptive
        steps are linearly interpolated onto `ts` (as in the published code; see
        `interpolate_steps`).
        """
        if isinstance(adjoint, diffrax.BacksolveAdjoint):
            # BacksolveAdjoint does not support SaveAt(steps=True) (and is not
            # affected by the SaveAt(ts=...) checkpointing bug).
            saveat = diffrax.SaveAt(ts=jnp.asarray(self.ts))
            sol = self.solve(model, solver, adjoint, saveat)
            return sol.ys, sol.stats["num_accepted_steps"]
        sol = self.solve(model, solver, adjoint)
        y0 = jnp.asarray(self.ys[0])
        nsteps = sol.stats["num_accepted_steps"]
        if self.adaptive:
            return interpolate_steps(sol, y0, jnp.asarray(self.ts)), nsteps
        return jnp.concatenate([y0[None], sol.ys]), nsteps


def problem_from_result(result: dict) -> Problem:
    """A `Problem` carrying just what the plots need, rebuilt from a results JSON."""
    return Problem(
        name=result["experiment"],
        title=result["title"],
        ts=np.asarray(result["ts"]),
        ys=np.asarray(result["data"]),
        time_dependent=False,
        solver="",
        num_steps=result["num_steps"],
        adaptive=result["adaptive"],
        state_labels=result.get("state_labels", ()),
        data_source=result["data_source"],
    )
