"""Terminating events: `diffeqsolve(..., event=diffrax.Event(cond_fn, root_finder))`.

diffrax's loop runs the events itself: it stops after the accepted step in which a
condition triggers (a boolean one turns true, a real one changes sign), and leaves
the final state `(y_N, solver_state_N)` at the end of that step, t_N. The backward
pass therefore starts from t_N as usual, with the number of accepted steps N taken
from the final state; an early stop only changes how t_N depends on `(t0, t1, dt0)`
(`StepTimes.may_stop_early`).

With a root finder, diffrax then finds the event time t* in the last step
[t_{N-1}, t_N] as the root of F(t) = c(t, y(t), args), y(t) being the step's dense
interpolation, and saves `(t*, y(t*))` as the output at `t1` (a boolean condition
that triggered gives F(t) = t_N - t, so t* = t_N). The cotangent of `(t*, y*)` is
pulled back through the interpolation and, for t*, by the implicit function
theorem,

    dt* = -(dF/dθ) / (dF/dt)   for θ = (dense information, t_{N-1}, t_N, args, c),

onto the dense information of the last step (`dense_cotangent`), which the solver's
own pullback then takes back to the state at t_{N-1}: the gradient optimistix gives
`diffrax.RecursiveCheckpointAdjoint` through `optx.root_find`.

Each `cond_fn` is closure-converted (as the vector fields are), and called with the
keyword arguments of the solve closed over, so that what it depends on receives its
cotangent (`DiffInputs.event_fns`).
"""

from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from diffrax._heuristics import is_sde
from jaxtyping import Array, Bool, PyTree, Real

from .closure import _abstract  # pyright: ignore[reportPrivateUsage]
from .saveat import subsaveats


def cond_fns(event: diffrax.Event) -> list:
    """The condition functions of `event`, in diffrax's order (the first that
    triggers wins)."""
    return jtu.tree_leaves(event.cond_fn, is_leaf=callable)


def check_event(event: diffrax.Event | None, terms: PyTree, saveat) -> None:
    if event is None:
        return
    if is_sde(terms):
        raise NotImplementedError(
            "`ReversibleAdjoint` supports events on ODEs (and CDEs) only, not on "
            "SDEs. Use `adjoint=diffrax.RecursiveCheckpointAdjoint()` for an SDE "
            "with `event=...`."
        )
    if any(sub.steps != 0 for sub in subsaveats(saveat)):
        raise NotImplementedError(
            "`ReversibleAdjoint` does not support `SaveAt(steps=...)` together "
            "with `event=...`. Save at `SaveAt(t0=..., ts=..., t1=True)` (the "
            "output at `t1` is the one at the event), or use "
            "`adjoint=diffrax.RecursiveCheckpointAdjoint()`."
        )


class _Cond(eqx.Module):
    """A closure-converted condition, called as diffrax calls conditions (the
    keyword arguments were closed over when it was converted)."""

    fn: Any

    def __call__(self, t, y, args, **kwargs):
        del kwargs
        return self.fn(t, y, args)


def convert_event(event: diffrax.Event, *, y0, args, **kwargs) -> list:
    """Closure-convert each `cond_fn(t, y, args, **kwargs)` of `event` into a
    function of `(t, y, args)` whose closed-over arrays are PyTree leaves."""
    t0 = kwargs["t0"]
    t_, y_ = _abstract((t0, y0), eqx.is_array_like)
    args_ = _abstract(args, eqx.is_array)
    converted = []
    for fn in cond_fns(event):

        def cond(t, y, args, fn=fn):
            return fn(t, y, args, **kwargs)

        converted.append(eqx.filter_closure_convert(cond, t_, y_, args_))
    return converted


def with_cond_fns(event: diffrax.Event, fns: list) -> diffrax.Event:
    """`event` with its conditions replaced by the converted `fns`."""
    treedef = jtu.tree_structure(event.cond_fn, is_leaf=callable)
    cond_fn = jtu.tree_unflatten(treedef, [_Cond(fn) for fn in fns])
    return eqx.tree_at(lambda e: e.cond_fn, event, cond_fn)


def is_real(fn, t, y, args) -> bool:
    """Whether a (converted) condition is real-valued (else boolean)."""
    out = eqx.filter_eval_shape(fn, t, y, args)
    return jnp.issubdtype(out.dtype, jnp.floating)


class EventRecord(eqx.Module):
    """What the forward pass keeps of the event."""

    mask: list[Bool[Array, ""]]  # which condition triggered (at most one)
    t_event: Real[Array, ""] | None  # t*, with a root finder (else None)
    ts_saved: list[Array]  # per `SubSaveAt(ts)`: how many of its `ts` were saved

    def happened(self) -> Bool[Array, ""]:
        return jnp.any(jnp.stack([jnp.asarray(m) for m in self.mask]))

    def root_happened(self) -> Bool[Array, ""]:
        """Whether the output at `t1` is the one at a root-found event time."""
        if self.t_event is None:
            return jnp.asarray(False)
        return self.happened()


def event_pullback(
    record: EventRecord,
    fns: list,
    real: list[bool],
    interpolation_cls,
    dense_info: PyTree,
    t_a: Real[Array, ""],
    t_b: Real[Array, ""],
    args: PyTree,
    t_bar: Real[Array, ""],
    y_bar: PyTree,
):
    """Pull the cotangents `(t_bar, y_bar)` of `(t*, y(t*))` back to the dense
    information of the last step, its times `(t_a, t_b)`, `args` and the
    conditions `fns`. Returns `(dense_info_bar, t_a_bar, t_b_bar, args_bar,
    fns_bar)`."""
    t_star = record.t_event
    assert t_star is not None

    def interpolate(t, dense_info_, t_a_, t_b_):
        return interpolation_cls(t0=t_a_, t1=t_b_, **dense_info_).evaluate(t)

    def residual(t, dense_info_, t_a_, t_b_, args_, fns_):
        y = interpolate(t, dense_info_, t_a_, t_b_)
        total = jnp.zeros((), jnp.result_type(t))
        for mask, fn, real_ in zip(record.mask, fns_, real):
            value = fn(t, y, args_) if real_ else t_b_ - t
            total = total + jnp.where(mask, value, 0).astype(total.dtype)
        return total

    _, vjp_y = eqx.filter_vjp(interpolate, t_star, dense_info, t_a, t_b)
    t_bar_y, d_bar_y, ta_bar_y, tb_bar_y = vjp_y(y_bar)
    total_t_bar = t_bar + t_bar_y

    def f_of_t(t):
        return residual(t, dense_info, t_a, t_b, args, fns)

    _, f_t = jax.jvp(f_of_t, (t_star,), (jnp.ones_like(t_star),))
    safe_f_t = jnp.where(f_t == 0, 1, f_t)
    lam = jnp.where(f_t == 0, 0, -total_t_bar / safe_f_t)
    _, vjp_f = eqx.filter_vjp(
        lambda *xs: residual(t_star, *xs), dense_info, t_a, t_b, args, fns
    )
    d_bar_f, ta_bar_f, tb_bar_f, args_bar, fns_bar = vjp_f(lam.astype(f_t.dtype))
    dense_info_bar = jtu.tree_map(
        lambda a, b: a + b, eqx.filter(d_bar_y, eqx.is_array), d_bar_f
    )
    return (
        dense_info_bar,
        ta_bar_y + ta_bar_f,
        tb_bar_y + tb_bar_f,
        args_bar,
        fns_bar,
    )


def maybe_event_pullback(is_last: Bool[Array, ""], *operands):
    """`pull_back_event_step` on the last step, zeros elsewhere (a `lax.cond`)."""

    def pull_back():
        return pull_back_event_step(*operands)

    shapes = eqx.filter_eval_shape(pull_back)
    zeros = jtu.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    return lax.cond(is_last, pull_back, lambda: zeros)


def _select(bar: PyTree, index, pred) -> PyTree:
    return jtu.tree_map(lambda x: jnp.where(pred, x[index], 0), bar)


def pull_back_event_step(
    record: EventRecord,
    cond_fns_: list,
    real: list[bool],
    outputs,
    slots: list,
    ts_bars: list,
    interpolation_cls,
    dense_info: PyTree,
    t_a: Real[Array, ""],
    t_b: Real[Array, ""],
    args: PyTree,
):
    """The outputs at a root-found event time, `sub.fn(t*, y(t*), args)` and the
    saved time t* itself, for every sub that saves at `t1` (`slots`), pulled back
    to the last step (`event_pullback`). Returns `(dense_info_bar, t_a_bar,
    t_b_bar, args_bar, cond_fns_bar, sub_fns_bar)`."""
    t_star = record.t_event
    assert t_star is not None
    y_star = interpolation_cls(t0=t_a, t1=t_b, **dense_info).evaluate(t_star)
    with_t1 = [j for j, sub in enumerate(outputs.subs) if sub.t1]

    def saved(t, y, args_, fns):
        return [fn(t, y, args_) for fn in fns]

    fns = [outputs.subs[j].fn for j in with_t1]
    cotangents = [
        eqx.filter(_select(outputs.bars[j], *slots[j]), eqx.is_inexact_array)
        for j in with_t1
    ]
    _, vjp = eqx.filter_vjp(saved, t_star, y_star, args, fns)
    t_bar, y_bar, args_bar, fns_bar = vjp(cotangents)
    for j in with_t1:
        index, pred = slots[j]
        t_bar = t_bar + jnp.where(pred, ts_bars[j][index], 0)
    d_bar, ta_bar, tb_bar, args_bar_e, conds_bar = event_pullback(
        record,
        cond_fns_,
        real,
        interpolation_cls,
        dense_info,
        t_a,
        t_b,
        args,
        t_bar,
        y_bar,
    )
    args_bar = jtu.tree_map(
        lambda a, b: a + b, eqx.filter(args_bar, eqx.is_inexact_array), args_bar_e
    )
    return d_bar, ta_bar, tb_bar, args_bar, conds_bar, dict(zip(with_t1, fns_bar))


def add_saved_times(outputs, slots: list, ts_bars: list, record, times, grads):
    """Cotangents of the saved times (`sol.ts`): at t0, at each `ts` (those that
    were saved) and at `t1` (t_N; t* is `pull_back_event_step`'s). `record` is the
    `EventRecord`, or None without an event. (The times saved by
    `SubSaveAt(steps=...)` are `SavedOutputs.at_step`'s.)"""
    zero = jnp.asarray(0)
    skip_t1 = jnp.asarray(False) if record is None else record.root_happened()
    i = 0
    for j, sub in enumerate(outputs.subs):
        bar = ts_bars[j]
        if bar.shape[0] == 0:
            continue
        offset = 1 if sub.t0 else 0
        if sub.t0:
            grads = grads.add_time(times, zero, bar[0])
        if sub.ts is not None:
            k = jnp.arange(len(sub.ts))
            saved = bar[offset : offset + len(sub.ts)]
            if record is not None:
                saved = jnp.where(k < record.ts_saved[i], saved, 0)
            grads = eqx.tree_at(lambda g: g.ts[i], grads, grads.ts[i] + saved)
            i += 1
        if sub.t1:
            index, pred = slots[j]
            t_bar = jnp.where(pred & ~skip_t1, bar[jnp.minimum(index, len(bar) - 1)], 0)
            grads = grads.add_time(times, times.num_steps, t_bar)
    return grads
