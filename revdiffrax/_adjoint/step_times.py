"""The accepted step times t_0, ..., t_N of the forward solve, and how they depend
on the differentiable time inputs `(t0, t1, dt0)`."""

import diffrax
import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, Real


def controller_kind(stepsize_controller: diffrax.AbstractStepSizeController) -> str:
    """How a step size controller places the step times: "constant", "stepto" or
    "adaptive"."""
    if isinstance(stepsize_controller, diffrax.ConstantStepSize):
        return "constant"
    if isinstance(stepsize_controller, diffrax.StepTo):
        return "stepto"
    return "adaptive"


class StepTimes(eqx.Module):
    r"""The recorded step times of the forward solve, and their dependence on
    `(t0, t1, dt0)`.

    Besides `t_0 = t0`, the forward pass records `t_1, ..., t_N` (then `inf`) in a
    buffer of length `max_steps`. diffrax always ends on `t_N = t1`; before that the
    dependence on the time inputs is linear, with coefficients fixed by the step
    size controller:

    - `ConstantStepSize`: $t_1 = t_0 + dt_0$ and $t_n = t_0 + (t_1 - t_0) n / N$ for
      $n \ge 2$, with $N = \lceil (t_1 - t_0) / dt_0 \rceil$ (diffrax 0.7.2 splits the
      interval uniformly after the first step);
    - adaptive controllers: every step size is the previous one times a
      stop-gradiented factor, so $t_n = t_0 + dt_0 S_n$ with $S_n$ constant, i.e.
      $\partial t_n / \partial t_0 = 1$ and
      $\partial t_n / \partial dt_0 = (t_n - t_0) / dt_0$. (Exact unless steps were
      clipped by `dtmin`, `dtmax`, `step_ts` or `jump_ts`; with `dt0=None` the first
      step is stop-gradiented by diffrax and only the first term remains.)
    - `StepTo`: $t_n$ are the user's times, $t_0$ = `t0` and $t_N$ = `t1`.
    """

    t0: Real[Array, ""]
    dt0: Real[Array, ""] | None
    recorded: Float[Array, " max_steps"]  # t_1, ..., t_N, then inf
    num_steps: Int[Array, ""]  # N, the number of accepted steps
    kind: str = eqx.field(static=True)

    def __getitem__(self, n: Int[Array, ""]) -> Real[Array, ""]:
        """The time t_n."""
        return jnp.where(n == 0, self.t0, self.recorded[jnp.maximum(n - 1, 0)])

    def coefficients(
        self, n: Int[Array, ""]
    ) -> tuple[Real[Array, ""], Real[Array, ""], Real[Array, ""]]:
        """`(dt_n/dt0, dt_n/dt1, dt_n/d(dt0))`."""
        dtype = jnp.result_type(self.t0)
        num_steps = self.num_steps
        is_first = n == 0
        is_last = (n == num_steps) & (num_steps > 0)
        zero = jnp.zeros((), dtype)
        if self.kind == "stepto":
            c0 = jnp.where(is_first, 1.0, 0.0).astype(dtype)
            c1 = jnp.where(is_last, 1.0, 0.0).astype(dtype)
            return c0, c1, zero
        c0 = jnp.where(is_last, 0.0, 1.0).astype(dtype)
        c1 = jnp.where(is_last, 1.0, 0.0).astype(dtype)
        if self.kind == "constant":
            frac = n.astype(dtype) / jnp.maximum(num_steps, 1).astype(dtype)
            uniform = (n >= 2) & ~is_last
            c0 = jnp.where(uniform, 1 - frac, c0)
            c1 = jnp.where(uniform, frac, c1)
            c_dt = jnp.where((n == 1) & ~is_last, 1.0, 0.0)
            return c0.astype(dtype), c1.astype(dtype), c_dt.astype(dtype)
        if self.dt0 is None:
            c_dt = zero
        else:
            safe_dt0 = jnp.where(self.dt0 == 0, 1, self.dt0)
            c_dt = jnp.where(is_last, 0.0, (self[n] - self.t0) / safe_dt0)
        return c0, c1, c_dt.astype(dtype)
