"""Cotangents: of the saved outputs (read on the backward pass), and of the solve's
differentiable inputs (accumulated over it)."""

from typing import Any

import diffrax
import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
from diffrax._integrate import SaveState
from equinox.internal import ω
from jaxtyping import Array, Int, PyTree, Real

from .._varying import varying_while_loop
from .saveat import steps_output, t1_output
from .step_times import StepTimes


def diff_part(tree: PyTree) -> PyTree:
    """The inexact arrays of `tree` (`None` elsewhere): the structure of its
    cotangents."""
    return eqx.filter(tree, eqx.is_inexact_array)


def zero_cotangent(tree: PyTree) -> PyTree:
    return jtu.tree_map(jnp.zeros_like, diff_part(tree))


def materialise(cotangent: PyTree, primal: PyTree) -> PyTree:
    """Replace symbolic-zero (`None`) leaves of a cotangent with arrays of zeros."""
    return jtu.tree_map(
        lambda c, p: zero_cotangent(p) if c is None else c,
        cotangent,
        diff_part(primal),
        is_leaf=lambda x: x is None,
    )


def add(a: PyTree, b: PyTree) -> PyTree:
    """a + b for two cotangents of the same primal."""
    return (ω(a) + ω(b)).ω


class InputCotangents(eqx.Module):
    """Cotangents of the differentiable inputs of the solve, accumulated over the
    backward pass. Each holds the inexact arrays of its primal, `None` elsewhere."""

    params: PyTree  # (terms, args)
    t0: Real[Array, ""]
    t1: Real[Array, ""]
    dt0: Real[Array, ""]
    ts: list[Array]  # one per `SubSaveAt` with `ts`
    fns: list[PyTree]  # one per `SubSaveAt`: of what its `fn` closes over
    events: PyTree = None  # of what the event conditions close over (`events.py`)

    @classmethod
    def zeros(
        cls, params: PyTree, t0: Any, ts: list[Array], fns: list, events: Any = None
    ) -> "InputCotangents":
        zero = jnp.zeros((), jnp.result_type(t0))
        return cls(
            zero_cotangent(params),
            zero,
            zero,
            zero,
            [jnp.zeros_like(x) for x in ts],
            [zero_cotangent(fn) for fn in fns],
            zero_cotangent(events),
        )

    def add_events(self, events_bar: PyTree) -> "InputCotangents":
        return eqx.tree_at(
            lambda g: g.events, self, add(self.events, events_bar), is_leaf=_is_none
        )

    def add_fn(self, j: int, fn_bar: PyTree) -> "InputCotangents":
        """Add the cotangent of the j-th `SubSaveAt`'s `fn`."""
        return eqx.tree_at(lambda g: g.fns[j], self, add(self.fns[j], fn_bar))

    def add_params(self, params_bar: PyTree) -> "InputCotangents":
        return eqx.tree_at(lambda g: g.params, self, add(self.params, params_bar))

    def with_params(self, params_bar: PyTree) -> "InputCotangents":
        return eqx.tree_at(lambda g: g.params, self, params_bar)

    def add_args(self, args_bar: PyTree) -> "InputCotangents":
        terms_bar, acc = self.params
        return eqx.tree_at(lambda g: g.params, self, (terms_bar, add(acc, args_bar)))

    def add_time(
        self, times: StepTimes, n: Int[Array, ""], t_bar: Real[Array, ""]
    ) -> "InputCotangents":
        """Add the cotangent `t_bar` of the step time t_n."""
        c0, c1, c_dt = times.coefficients(n)
        return eqx.tree_at(
            lambda g: (g.t0, g.t1, g.dt0),
            self,
            (self.t0 + c0 * t_bar, self.t1 + c1 * t_bar, self.dt0 + c_dt * t_bar),
        )


def _is_none(x: Any) -> bool:
    return x is None


def _is_save_state(x: Any) -> bool:
    return isinstance(x, SaveState)


def save_states(tree: Any) -> list[SaveState]:
    leaves = jtu.tree_leaves(tree, is_leaf=_is_save_state)
    return [s for s in leaves if _is_save_state(s)]


def output_cotangents(grad_final_state: Any, init_state: Any) -> list[PyTree[Array]]:
    """The cotangent of each `SubSaveAt`'s output buffer, zeros where an output was
    not differentiated. The forward pass allocated the buffers in `init_state`, so
    their shapes are known even then."""
    buffers = [s.ys for s in save_states(init_state.save_state)]
    if grad_final_state is None:
        bars = []
    else:
        bars = [s.ys for s in save_states(grad_final_state.save_state)]
    if len(bars) == 0:
        bars = [None] * len(buffers)
    return [
        jtu.tree_map(jnp.zeros_like, ys) if bar is None else materialise(bar, ys)
        for ys, bar in zip(buffers, bars)
    ]


def output_ts_cotangents(grad_final_state: Any, init_state: Any) -> list[Array]:
    """The cotangent of each `SubSaveAt`'s saved times (`sol.ts`), zeros where
    they were not differentiated."""
    buffers = [s.ts for s in save_states(init_state.save_state)]
    if grad_final_state is None:
        bars = [None] * len(buffers)
    else:
        bars = [s.ts for s in save_states(grad_final_state.save_state)]
        if len(bars) == 0:
            bars = [None] * len(buffers)
    return [
        jnp.zeros_like(ts) if bar is None else bar for ts, bar in zip(buffers, bars)
    ]


def select(tree: PyTree[Array], index: Int[Array, ""], pred: Any = True) -> PyTree:
    """Entry `index` of every leaf of `tree`, or zeros where `pred` is false."""
    return jtu.tree_map(lambda x: jnp.where(pred, x[index], 0), tree)


def _call(fn, t, y, args):
    return fn(t, y, args)


def pull_back_save(
    sub: diffrax.SubSaveAt,
    j: int,
    cotangent: PyTree,
    times: StepTimes,
    n: Int[Array, ""],
    y: PyTree,
    args: PyTree,
    y_bar: PyTree,
    grads: InputCotangents,
) -> tuple[PyTree, InputCotangents]:
    """Pull `cotangent` back through the output `sub.fn(t_n, y, args)` saved at step
    n (by the j-th `SubSaveAt`), adding to the cotangents of `y` and of the inputs."""
    _, vjp = eqx.filter_vjp(_call, sub.fn, times[n], y, args)
    fn_bar, t_bar, y_bar_, args_bar = vjp(diff_part(cotangent))
    grads = grads.add_args(args_bar).add_time(times, n, t_bar).add_fn(j, fn_bar)
    return add(y_bar, y_bar_), grads


class SavedOutputs(eqx.Module):
    """The `SubSaveAt`s of the solve and the cotangents their outputs received.

    Each sub's outputs are laid out as `[t0] [ts...] [steps...] [t1]`; this class
    pulls each cotangent back to the state (and time) it was saved from, as the
    backward pass reaches that state.
    """

    subs: list[diffrax.SubSaveAt]  # with the differentiable `ts`
    bars: list[PyTree[Array]]  # the cotangent of each sub's output buffer
    # The cotangent of each sub's saved times (`sol.ts`), or None where no input
    # they depend on is differentiated.
    ts_bars: list[Array] | None = None

    def _with_ts(self):
        """`(i, j, sub, bar)` for the i-th sub with `ts`, the j-th sub."""
        subs = enumerate(zip(self.subs, self.bars))
        triples = [(j, s, b) for j, (s, b) in subs if s.ts is not None]
        return [(i, j, s, b) for i, (j, s, b) in enumerate(triples)]

    def t1_slots(self, times, ts_saved):
        """`(index, pred)` of each sub's output at `t1` (`t1_output`); after an
        event, `ts_saved` counts the `ts` of each sub with `ts` that were saved
        (else None: all of them)."""
        slots, i = [], 0
        for sub in self.subs:
            saved = None
            if sub.ts is not None and ts_saved is not None:
                saved, i = ts_saved[i], i + 1
            slots.append(t1_output(sub, times.num_steps, saved))
        return slots

    def at_final_step(
        self, times, y, args, y_bar, grads, ts_saved=None, skip: Any = False
    ):
        """Outputs saved at t1 and after the last step, from y_N (not those at t1
        where `skip`: a root-found event time, `events.py`)."""
        n = times.num_steps
        slots = self.t1_slots(times, ts_saved)
        for j, (sub, bar) in enumerate(zip(self.subs, self.bars)):
            leaves = jtu.tree_leaves(bar)
            size = leaves[0].shape[0] if leaves else 0
            if size == 0:
                continue
            index, pred = slots[j]
            pred = pred & jnp.logical_not(skip)
            cotangent = select(bar, jnp.minimum(index, size - 1), pred)
            y_bar, grads = pull_back_save(
                sub, j, cotangent, times, n, y, args, y_bar, grads
            )
        return self.at_step(times, n, y, args, y_bar, grads)

    def at_step(self, times, n, y, args, y_bar, grads):
        """Outputs of `SubSaveAt(steps=k)` saved after accepted step n, from y_n,
        and their saved time t_n."""
        for j, (sub, bar) in enumerate(zip(self.subs, self.bars)):
            if sub.steps == 0:
                continue
            index, pred = steps_output(sub, n)
            cotangent = select(bar, index, pred)
            y_bar, grads = pull_back_save(
                sub, j, cotangent, times, n, y, args, y_bar, grads
            )
            if self.ts_bars is not None:
                grads = grads.add_time(times, n, select(self.ts_bars[j], index, pred))
        return y_bar, grads

    def in_step(self, times, m, dense_info, interpolation_cls, args, ts_left, grads):
        """Outputs of `SubSaveAt(ts=...)` interpolated in step m (those with
        t_m < ts_k <= t_{m+1}, and ts_k = t_0 on the first step), pulled back to the
        step's dense information. `ts_left[i]` counts the i-th sub's `ts` not yet
        pulled back.

        Returns the cotangent of the dense information, the new `ts_left`, `grads`
        with the cotangents of the times and `ts` added, and the cotangent of `args`
        (apart: the solver's pullback accumulates that of `(terms, args)`)."""
        dense_info_bar = zero_cotangent(dense_info)
        args_bar = zero_cotangent(args)
        new_left = []
        for i, j, sub, bar in self._with_ts():
            left, dense_info_bar, sub_args_bar, ta_bar, tb_bar, ts_bar, fn_bar = (
                _ts_in_step(
                    sub,
                    bar,
                    times,
                    m,
                    dense_info,
                    interpolation_cls,
                    args,
                    ts_left[i],
                    dense_info_bar,
                )
            )
            new_left.append(left)
            args_bar = add(args_bar, sub_args_bar)
            grads = grads.add_time(times, m, ta_bar).add_time(times, m + 1, tb_bar)
            grads = eqx.tree_at(lambda g: g.ts[i], grads, grads.ts[i] + ts_bar)
            grads = grads.add_fn(j, fn_bar)
        return dense_info_bar, new_left, grads, args_bar

    def at_start(self, times, y0, args, ts_left, y_bar, grads):
        """Outputs saved at t0, from y_0: `SubSaveAt(t0=True)`, and the `ts` left
        when t0 == t1 (diffrax then saves `fn(t0, y0, args)` for each)."""
        zero = jnp.asarray(0)
        for i, j, sub, bar in self._with_ts():
            offset = 1 if sub.t0 else 0

            def body(carry, sub=sub, j=j, bar=bar, offset=offset):
                left, y_bar_, grads_ = carry
                cotangent = select(bar, offset + left - 1)
                y_bar_, grads_ = pull_back_save(
                    sub, j, cotangent, times, zero, y0, args, y_bar_, grads_
                )
                return left - 1, y_bar_, grads_

            _, y_bar, grads = varying_while_loop(
                lambda c: c[0] > 0, body, (ts_left[i], y_bar, grads)
            )
        for j, (sub, bar) in enumerate(zip(self.subs, self.bars)):
            if sub.t0:
                cotangent = select(bar, zero)
                y_bar, grads = pull_back_save(
                    sub, j, cotangent, times, zero, y0, args, y_bar, grads
                )
        return y_bar, grads


def _ts_in_step(
    sub, bar, times, m, dense_info, interpolation_cls, args, left, dense_info_bar
):
    """The `SaveAt(ts)` outputs of one sub interpolated in step m: a while loop over
    them, latest first. Returns the cotangents of the dense information, `args`,
    t_m, t_{m+1}, `ts` and `sub.fn`."""
    t_a = times[m]
    t_b = times.end(m)
    ts = sub.ts
    offset = 1 if sub.t0 else 0

    def save(dense_info_, t_a_, t_b_, t_k, args_, fn):
        interpolation = interpolation_cls(t0=t_a_, t1=t_b_, **dense_info_)
        return fn(t_k, interpolation.evaluate(t_k), args_)

    def cond(carry):
        left_ = carry[0]
        return (left_ > 0) & ((m == 0) | (ts[jnp.maximum(left_ - 1, 0)] > t_a))

    def body(carry):
        left_, d_bar, args_bar, ta_bar, tb_bar, ts_bar, fn_bar = carry
        k = left_ - 1
        _, vjp = eqx.filter_vjp(save, dense_info, t_a, t_b, ts[k], args, sub.fn)
        cotangent = diff_part(select(bar, offset + k))
        d_bar_, ta_bar_, tb_bar_, tk_bar, args_bar_, fn_bar_ = vjp(cotangent)
        return (
            k,
            add(d_bar, d_bar_),
            add(args_bar, args_bar_),
            ta_bar + ta_bar_,
            tb_bar + tb_bar_,
            ts_bar.at[k].add(tk_bar),
            add(fn_bar, fn_bar_),
        )

    zero = jnp.zeros((), jnp.result_type(t_a))
    init = (
        left,
        dense_info_bar,
        zero_cotangent(args),
        zero,
        zero,
        jnp.zeros_like(ts),
        zero_cotangent(sub.fn),
    )
    return varying_while_loop(cond, body, init)
