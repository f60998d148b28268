"""The accepted step times t_0, ..., t_N of the forward solve, and how they depend
on the differentiable time inputs `(t0, t1, dt0)`."""

import diffrax
import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, Real


def controller_kind(stepsize_controller: diffrax.AbstractStepSizeController) -> str:
    """How a step size controller places the step times: "constant", "stepto" or
    "adaptive"."""
    if isinstance(stepsize_controller, diffrax.ConstantStepSize):
        return "constant"
    if isinstance(stepsize_controller, diffrax.StepTo):
        return "stepto"
    return "adaptive"


def needs_recording(stepsize_controller: diffrax.AbstractStepSizeController) -> bool:
    """Whether the forward pass must record the step times: only adaptive
    controllers place them in a way that cannot be recomputed (`StepTimes`)."""
    return controller_kind(stepsize_controller) == "adaptive"


def clip_floor(t1: Real[Array, ""]) -> Real[Array, ""]:
    """diffrax's loop rounds a step end above this, 100 ULPs below `t1`, to `t1`
    (`diffrax._integrate._clip_to_end`)."""
    floor = t1
    for _ in range(100):
        floor = eqxi.prevbefore(floor)
    return floor


class StepClips(eqx.Module):
    """Where an adaptive controller clips a proposed step (diffrax 0.7.2): the step
    size to `[dtmin, dtmax]` (`PIDController`), the step's end to the next
    `step_ts` or to just before the next `jump_ts` (`ClipStepSizeController`, also
    made by `PIDController(step_ts=..., jump_ts=...)`). A clip replaces the step's
    end by a value whose derivative diffrax takes to be that of the step's start
    (a clipped size is a constant) or zero (a clipped end is a constant)."""

    dtmin: Real[Array, ""] | None
    dtmax: Real[Array, ""] | None
    ends: Real[Array, " k"] | None  # `step_ts` and `prevbefore(jump_ts)`

    @classmethod
    def of(cls, stepsize_controller) -> "StepClips":
        dtmin = dtmax = None
        ends = []
        controller = stepsize_controller
        while controller is not None:
            if isinstance(controller, diffrax.ClipStepSizeController):
                if controller.store_rejected_steps is not None:
                    raise NotImplementedError(
                        "`ReversibleAdjoint` cannot differentiate the step times "
                        "with respect to `t0`, `t1` or `dt0` under "
                        "`ClipStepSizeController(store_rejected_steps=...)`, which "
                        "later clips steps to earlier rejected times. Use "
                        "`adjoint=diffrax.RecursiveCheckpointAdjoint()`, or do not "
                        "differentiate with respect to the time inputs."
                    )
                if controller.step_ts is not None:
                    ends.append(jnp.asarray(controller.step_ts))
                if controller.jump_ts is not None:
                    ends.append(eqxi.prevbefore(jnp.asarray(controller.jump_ts)))
            if isinstance(controller, diffrax.PIDController):
                dtmin, dtmax = controller.dtmin, controller.dtmax
            controller = getattr(controller, "controller", None)
        return cls(
            None if dtmin is None else jnp.asarray(dtmin),
            None if dtmax is None else jnp.asarray(dtmax),
            jnp.concatenate(ends) if ends else None,
        )

    def end_clipped(self, t: Real[Array, ""]) -> Bool[Array, ""]:
        """Whether a step ending at t was clipped to a `step_ts` or a jump."""
        if self.ends is None:
            return jnp.asarray(False)
        return jnp.any(t == self.ends.astype(jnp.result_type(t)))

    def size_clipped(
        self, start: Real[Array, ""], t: Real[Array, ""]
    ) -> Bool[Array, ""]:
        """Whether a step from `start` ending at t had its size clipped to `dtmin`
        or `dtmax` (diffrax adds the clipped size to the start)."""
        clipped = jnp.asarray(False)
        for bound in (self.dtmin, self.dtmax):
            if bound is not None:
                clipped = clipped | (t == start + bound.astype(jnp.result_type(t)))
        return clipped


def _unit(i: int, dtype) -> Float[Array, " 3"]:
    return jnp.zeros(3, dtype).at[i].set(1)


class TimeCoefficients(eqx.Module):
    r"""$\partial t / \partial (t_0, t_1, dt_0)$ of diffrax's `tprev` and `tnext`
    while the loop runs, and of the end of every accepted step.

    An adaptive controller proposes `tnext = tprev' + f (tnext - tprev)` from the
    attempted step, with a stop-gradiented factor f, so each proposal's
    coefficients are those of the step's start plus f times those of the attempted
    step, with f read off the times themselves. A clip replaces them (`StepClips`):
    by those of the start where the step size was clipped to `dtmin`/`dtmax`, by
    zero where the end was clipped to a `step_ts` or a jump, and by $e_{t_1}$ where
    diffrax clipped it to `t1`. Tracked forward, only when a time input is
    differentiated (`forward`).
    """

    prev: Float[Array, " 3"]
    next: Float[Array, " 3"]
    ends: Float[Array, "max_steps 3"]  # of accepted steps 0, 1, ...

    @classmethod
    def start(cls, first: Float[Array, " 3"], max_steps: int) -> "TimeCoefficients":
        """From the coefficients `first` of the first step's end (`first_end`)."""
        dtype = first.dtype
        return cls(_unit(0, dtype), first, jnp.zeros((max_steps, 3), dtype))

    def update(self, state, new_state, t1, clips: StepClips) -> "TimeCoefficients":
        """After one iteration of diffrax's loop (`state` -> `new_state`)."""
        accepted = new_state.num_accepted_steps > state.num_accepted_steps
        # The next step starts at the end of an accepted step (then perhaps moved
        # past a jump, by a derivative-one `nextafter`), else where it did.
        prev = jnp.where(accepted, self.next, self.prev)
        start = jnp.where(accepted, state.tnext, state.tprev)
        attempted = state.tnext - state.tprev
        factor = (new_state.tnext - start) / jnp.where(attempted == 0, 1, attempted)
        next_ = prev + factor * (self.next - self.prev)
        next_ = jnp.where(clips.size_clipped(start, new_state.tnext), prev, next_)
        next_ = jnp.where(clips.end_clipped(new_state.tnext), 0, next_)
        e_t1 = _unit(1, next_.dtype)
        next_ = jnp.where(new_state.tnext == t1, e_t1, next_).astype(self.next.dtype)
        # Out of range (so dropped) unless the step was accepted: no copy of `ends`.
        index = jnp.where(accepted, state.num_accepted_steps, self.ends.shape[0])
        ends = self.ends.at[index].set(self.next, mode="drop")
        return TimeCoefficients(prev, next_, ends)


def first_end(
    stepsize_controller,
    tnext: Real[Array, ""],
    t0: Real[Array, ""],
    t1: Real[Array, ""],
    dt0: Real[Array, ""] | None,
    controller_init,
) -> Float[Array, " 3"]:
    r"""$\partial / \partial (t_0, t_1, dt_0)$ of `tnext`, the end of the first
    step as `diffeqsolve` set it: `controller_init(t0, t1, dt0)` (the controller's
    `init`, with `dt0`; None for a passed controller state, which takes
    `t0 + dt0`), clipped to `t1`. Differentiated as diffrax does; without `dt0`
    the first step size is stop-gradiented, so only the clips matter."""
    dtype = jnp.result_type(tnext)
    if dt0 is None:
        clips = StepClips.of(stepsize_controller)
        c = jnp.where(clips.end_clipped(tnext), 0, _unit(0, dtype))
        return jnp.where(tnext == t1, _unit(1, dtype), c).astype(dtype)

    def end(times):
        t0_, t1_, dt0_ = times[0], times[1], times[2]
        if controller_init is None:
            proposal = t0_ + dt0_
        else:
            proposal = controller_init(t0_, t1_, dt0_)
        return jnp.minimum(proposal, t1_)

    times = jnp.stack([t0, t1, dt0]).astype(dtype)
    _, coefficients = jax.vmap(lambda v: jax.jvp(end, (times,), (v,)))(
        jnp.eye(3, dtype=dtype)
    )
    return coefficients.astype(dtype)


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
    - adaptive controllers: every step size is the previous attempted one times a
      stop-gradiented factor, unless it was clipped (to `t1`, `dtmin`, `dtmax`,
      `step_ts` or a jump), so $t_n$ is piecewise linear in $(t_0, t_1, dt_0)$,
      with coefficients tracked on the forward pass when a time input is
      differentiated (`TimeCoefficients`). (With `dt0=None` the first step is
      stop-gradiented by diffrax, and there is no `dt0` to differentiate.)
    - `StepTo`: $t_n$ are the user's times, $t_0$ = `t0` and $t_N$ = `t1`.

    Only adaptive controllers need the recorded buffer. The times of the other two
    are recomputed by the formulas diffrax uses, which saves the buffer (`max_steps`
    times, per batch element under `jax.vmap`). XLA may round them differently in the
    last bit (e.g. by contracting to a fused multiply-add), which perturbs the
    reconstruction by no more than its own rounding errors.
    """

    t0: Real[Array, ""]
    t1: Real[Array, ""]
    t1_floor: Real[Array, ""]  # `clip_floor(t1)`
    dt0: Real[Array, ""] | None
    recorded: Float[Array, " max_steps"] | None  # t_1, ..., t_N, then inf
    num_steps: Int[Array, ""]  # N, the number of accepted steps
    kind: str = eqx.field(static=True)
    stepto_ts: Real[Array, " N+1"] | None = None  # `StepTo.ts`
    # With `jump_ts`: the steps that end at a jump, and their ends (`jumps.py`).
    jump_end_steps: Int[Array, " jumps"] | None = None
    jump_ends: Real[Array, " jumps"] | None = None
    # d t_{n+1} / d(t0, t1, dt0) for adaptive controllers (`TimeCoefficients.ends`),
    # recorded when a time input is differentiated.
    time_coefficients: Float[Array, "max_steps 3"] | None = None
    # With an event, the solve may stop before `t1` (`events.py`): the last step
    # then ends where the controller put it, not at `t1`.
    may_stop_early: bool = eqx.field(default=False, static=True)
    # With `step_times="recompute"` (`rerun.py`): `recorded` holds the times
    # t_{a-1}, t_a, ..., t_{a+k} of the segment that starts at step a.
    segment_start: Int[Array, ""] | None = None

    def on_segment(self, start: Int[Array, ""], times: Real[Array, " k+2"]):
        """These times, with those of the segment at `start` recorded."""
        return eqx.tree_at(
            lambda s: (s.recorded, s.segment_start),
            self,
            (times, start),
            is_leaf=lambda x: x is None,
        )

    def end(self, m: Int[Array, ""]) -> Real[Array, ""]:
        """The end of step m: t_{m+1}, the start of the next step, unless step m ends
        at a jump, just before it (the next step starts just after it)."""
        t = self[m + 1]
        if self.jump_end_steps is None or self.jump_ends is None:
            return t
        hit = self.jump_end_steps == m
        return jnp.where(jnp.any(hit), self.jump_ends[jnp.argmax(hit)], t)

    def __getitem__(self, n: Int[Array, ""]) -> Real[Array, ""]:
        """The time t_n."""
        if self.segment_start is not None:
            assert self.recorded is not None
            size = self.recorded.shape[0]
            t = self.recorded[jnp.clip(n - self.segment_start + 1, 0, size - 1)]
            return jnp.where(n == 0, self.t0, t)
        if self.recorded is not None:
            return jnp.where(n == 0, self.t0, self.recorded[jnp.maximum(n - 1, 0)])
        if self.kind == "stepto":
            assert self.stepto_ts is not None
            size = self.stepto_ts.shape[0]
            t = self.stepto_ts[jnp.clip(n, 0, size - 1)]
            t = jnp.where(n >= 2, self._clip_to_end(t), t)
        else:
            t = self._constant(n)
        return jnp.where(n == 0, self.t0, jnp.where(n == 1, self._first(t), t))

    def _clip_to_end(self, t: Real[Array, ""]) -> Real[Array, ""]:
        return jnp.where(t > self.t1_floor, self.t1, t)

    def _first(self, t: Real[Array, ""]) -> Real[Array, ""]:
        """t_1: `diffeqsolve` ends the first step at the controller's first time,
        clipped to `t1` (and not rounded to it)."""
        if self.kind == "constant":
            assert self.dt0 is not None
            t = self.t0 + self.dt0
        return jnp.minimum(t, self.t1)

    def _planned_steps(self) -> Int[Array, ""]:
        """`ConstantStepSize`'s number of steps from t0 to t1, or -1 for an
        infinite `t1` (as diffrax 0.7.2 marks it)."""
        assert self.dt0 is not None
        num = jnp.ceil((self.t1 - self.t0) / eqxi.nextafter(self.dt0))
        return jnp.where(jnp.isfinite(self.t1), num.astype(jnp.int32), -1)

    def _constant(self, n: Int[Array, ""]) -> Real[Array, ""]:
        """t_n for n >= 2 under `ConstantStepSize`, as its `adapt_step_size` computes
        it (diffrax 0.7.2): a fraction of `t1 - t0`, `t1` on the last step."""
        assert self.dt0 is not None
        t0, t1 = self.t0, self.t1
        num = self._planned_steps()
        dtype = jnp.result_type(t0, t1)
        t = t0 + (t1 - t0) * (n.astype(dtype) / num.astype(dtype))
        t = jnp.where(n == num, t1, t)
        # `num_steps == -1` marks an infinite `t1`, where diffrax adds `dt0` instead.
        t = jnp.where(num >= 0, t, t0 + n.astype(dtype) * self.dt0)
        return self._clip_to_end(t)

    def coefficients(
        self, n: Int[Array, ""]
    ) -> tuple[Real[Array, ""], Real[Array, ""], Real[Array, ""]]:
        """`(dt_n/dt0, dt_n/dt1, dt_n/d(dt0))`."""
        dtype = jnp.result_type(self.t0)
        num_steps = self.num_steps
        is_first = n == 0
        is_last = (n == num_steps) & (num_steps > 0)
        if self.may_stop_early:
            is_last = is_last & (self[n] == self.t1)
        zero = jnp.zeros((), dtype)
        if self.kind == "stepto":
            c0 = jnp.where(is_first, 1.0, 0.0).astype(dtype)
            c1 = jnp.where(is_last, 1.0, 0.0).astype(dtype)
            return c0, c1, zero
        c0 = jnp.where(is_last, 0.0, 1.0).astype(dtype)
        c1 = jnp.where(is_last, 1.0, 0.0).astype(dtype)
        if self.kind == "adaptive" and self.time_coefficients is not None:
            size = self.time_coefficients.shape[0]
            c = self.time_coefficients[jnp.clip(n - 1, 0, size - 1)]
            c = jnp.where(is_first, jnp.eye(3, dtype=dtype)[0], c).astype(dtype)
            return c[0], c[1], c[2]
        if self.kind == "constant":
            planned = num_steps
            if self.may_stop_early:
                assert self.dt0 is not None
                planned = self._planned_steps()
            frac = n.astype(dtype) / jnp.maximum(planned, 1).astype(dtype)
            uniform = (n >= 2) & ~is_last
            c0 = jnp.where(uniform, 1 - frac, c0)
            c1 = jnp.where(uniform, frac, c1)
            c_dt = jnp.where((n == 1) & ~is_last, 1.0, 0.0)
            if self.may_stop_early:
                # An infinite `t1` (`planned == -1`): t_n = t0 + n dt0.
                infinite = planned < 0
                c0 = jnp.where(infinite, 1.0, c0)
                c1 = jnp.where(infinite, 0.0, c1)
                c_dt = jnp.where(infinite, n.astype(dtype), c_dt)
            return c0.astype(dtype), c1.astype(dtype), c_dt.astype(dtype)
        if self.dt0 is None:
            c_dt = zero
        else:
            safe_dt0 = jnp.where(self.dt0 == 0, 1, self.dt0)
            c_dt = jnp.where(is_last, 0.0, (self[n] - self.t0) / safe_dt0)
        return c0, c1, c_dt.astype(dtype)
