import functools as ft
import types
from collections.abc import Callable
from typing import Any

import diffrax
import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from diffrax._adjoint import _only_transpose_ys  # pyright: ignore[reportPrivateUsage]
from diffrax._heuristics import is_unsafe_sde
from diffrax._integrate import SaveState
from diffrax._term import WrapTerm

from ._solver import AbstractReversibleSolver, LeapfrogMidpoint, Reversible


_inner_loop = jax.named_call(eqxi.while_loop, name="inner-loop")
_outer_loop = jax.named_call(eqxi.while_loop, name="outer-loop")


def _is_subsaveat(x: Any) -> bool:
    return isinstance(x, diffrax.SubSaveAt)


def _is_none(x: Any) -> bool:
    return x is None


def _is_save_state(x: Any) -> bool:
    return isinstance(x, SaveState)


def _record_nothing(t, y, args):
    # Used with `SubSaveAt(steps=True)` so that diffrax records the accepted step
    # times (one scalar per step) and nothing else.
    del t, y, args
    return None


def _zeros_like(x):
    return jtu.tree_map(jnp.zeros_like, x)


def _tree_add(a, b):
    return jtu.tree_map(lambda x, y: x + y, a, b)


def _tree_scale(a, s):
    return jtu.tree_map(lambda x: s * x, a)


def _materialise(cotangent, primal):
    """Replace symbolic-zero (`None`) cotangents with arrays of zeros."""
    return jtu.tree_map(
        lambda c, p: c if (c is not None or p is None) else jnp.zeros_like(p),
        cotangent,
        primal,
        is_leaf=_is_none,
    )


def _diff_part(tree):
    return eqx.filter(tree, eqx.is_inexact_array)


def _vjp(fn, primals):
    """`jax.vjp` of `fn(primals)` with respect to the inexact arrays of `primals`.

    Returns `(out, vjp_fn)`, where `vjp_fn(cotangent)` takes a cotangent with the
    structure of `out` (non-inexact leaves ignored) and returns a cotangent with the
    structure of `primals` (`None` in place of non-inexact leaves).
    """
    diff, static = eqx.partition(primals, eqx.is_inexact_array)

    def _fn(_diff):
        _out = fn(eqx.combine(_diff, static))
        _diff_out, _static_out = eqx.partition(_out, eqx.is_inexact_array)
        return _diff_out, _static_out

    diff_out, vjp_fn, static_out = jax.vjp(_fn, diff, has_aux=True)
    out = eqx.combine(diff_out, static_out)

    def _vjp_fn(cotangent):
        (out_bar,) = vjp_fn(_diff_part(cotangent))
        return out_bar

    return out, _vjp_fn


def _relative_drift(y_rec, y_true):
    """Relative 2-norm of the reconstruction error of the initial condition."""
    leaves_rec = jtu.tree_leaves(y_rec)
    leaves_true = jtu.tree_leaves(y_true)
    err = sum(jnp.sum(jnp.abs(a - b) ** 2) for a, b in zip(leaves_rec, leaves_true))
    size = sum(jnp.sum(jnp.abs(b) ** 2) for b in leaves_true)
    err = jnp.sqrt(err)
    size = jnp.sqrt(size)
    return jnp.where(size > 0, err / jnp.where(size > 0, size, 1), err)


class _StepTimes(eqx.Module):
    """How the accepted step times t_0, ..., t_N depend on (t0, t1, dt0).

    These are the differentiable time inputs of the solve (a `dt0` computed from
    `t0` and `t1` passes their cotangents on). diffrax always ends on t_N = t1;
    before that, the dependence is linear with coefficients fixed by the controller:

    - ConstantStepSize: t_1 = t0 + dt0 and t_n = t0 + (t1 - t0) n / N for n >= 2,
      with N = ceil((t1 - t0) / dt0) (diffrax 0.7.2 splits the interval uniformly
      after the first step);
    - adaptive controllers: every step size is the previous one times a
      stop-gradiented factor, so t_n = t0 + dt0 S_n with S_n constant, i.e.
      dt_n/dt0 = 1 and dt_n/d(dt0) = (t_n - t0) / dt0. (Exact unless the steps were
      clipped by `dtmin`, `dtmax`, `step_ts` or `jump_ts`; with `dt0=None` the first
      step is stop-gradiented by diffrax and only the first term remains.)
    - StepTo: t_n are the user's times, t_0 = t0 and t_N = t1.
    """

    kind: str = eqx.field(static=True)

    def coefficients(self, n, num_steps, t_n, t0, dt0):
        dtype = jnp.result_type(t0)
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
            # diffrax's ConstantStepSize: t_1 = t0 + dt0, then the rest of [t0, t1]
            # is split uniformly, t_n = t0 + (t1 - t0) n / N for n >= 2, with
            # N = ceil((t1 - t0) / dt0).
            frac = n.astype(dtype) / jnp.maximum(num_steps, 1).astype(dtype)
            uniform = (n >= 2) & ~is_last
            c0 = jnp.where(uniform, 1 - frac, c0)
            c1 = jnp.where(uniform, frac, c1)
            c_dt = jnp.where((n == 1) & ~is_last, 1.0, 0.0)
            return c0.astype(dtype), c1.astype(dtype), c_dt.astype(dtype)
        if dt0 is None:
            c_dt = zero
        else:
            safe_dt0 = jnp.where(dt0 == 0, 1, dt0)
            c_dt = jnp.where(is_last, 0.0, (t_n - t0) / safe_dt0)
        return c0, c1, c_dt.astype(dtype)


def _controller_kind(stepsize_controller) -> str:
    if isinstance(stepsize_controller, diffrax.ConstantStepSize):
        return "constant"
    if isinstance(stepsize_controller, diffrax.StepTo):
        return "stepto"
    return "adaptive"


def _check_saveat(saveat: diffrax.SaveAt) -> None:
    if saveat.dense:
        raise NotImplementedError(
            "`ReversibleAdjoint` does not support `SaveAt(dense=True)`, which would "
            "store every step and defeat the O(1) memory of reversible "
            "backpropagation. Save at the times you need instead: "
            "`SaveAt(ts=...)` or `SaveAt(steps=True)`."
        )
    for sub in jtu.tree_leaves(saveat.subs, is_leaf=_is_subsaveat):
        if sub.ts is not None and sub.steps != 0:
            raise NotImplementedError(
                "`ReversibleAdjoint` does not support a single `SubSaveAt` with both "
                "`ts` and `steps`: use two, e.g. "
                "`SaveAt(subs=[SubSaveAt(ts=ts), SubSaveAt(steps=True)])`."
            )


def _check_inputs(*, solver, terms, event, max_steps, stepsize_controller, saveat):
    if not isinstance(solver, AbstractReversibleSolver):
        raise ValueError(
            "`ReversibleAdjoint` needs a reversible solver, got "
            f"`{type(solver).__name__}`. Wrap it: "
            f"`revdiffrax.Reversible(diffrax.{type(solver).__name__}())`, or use one "
            "of `revdiffrax.ReversibleHeun()`, `revdiffrax.LeapfrogMidpoint()`, "
            "`revdiffrax.SemiImplicitEuler()`, `revdiffrax.AsynchronousLeapfrog()`, "
            "`revdiffrax.SymmetricComposition(revdiffrax.AsynchronousLeapfrog())`."
        )
    if max_steps is None:
        raise ValueError(
            "`ReversibleAdjoint` records one time per accepted step in a buffer of "
            "length `max_steps`, so it needs a finite bound: pass e.g. "
            "`diffeqsolve(..., max_steps=4096)`."
        )
    if event is not None:
        raise NotImplementedError(
            "`ReversibleAdjoint` does not support events. Remove `event=...`, or use "
            "`adjoint=diffrax.RecursiveCheckpointAdjoint()`."
        )
    if is_unsafe_sde(terms):
        raise ValueError(
            "`ReversibleAdjoint` re-evaluates the Brownian motion on the backward "
            "pass, which `diffrax.UnsafeBrownianPath` cannot do. Use "
            "`diffrax.VirtualBrownianTree(t0, t1, tol, shape, key)` instead."
        )
    if isinstance(solver, LeapfrogMidpoint) and not isinstance(
        stepsize_controller, diffrax.ConstantStepSize
    ):
        raise ValueError(
            "`LeapfrogMidpoint` can only be reversed on a uniform grid: use "
            "`stepsize_controller=diffrax.ConstantStepSize()` with a `dt0` that "
            "divides `t1 - t0`."
        )
    if getattr(stepsize_controller, "jump_ts", None) is not None and not isinstance(
        solver, Reversible
    ):
        raise NotImplementedError(
            f"`{type(solver).__name__}` cannot be reversed across the jumps "
            "requested by `jump_ts`. Use `revdiffrax.Reversible(...)`, which is "
            "unaffected by jumps, or drop `jump_ts`."
        )
    _check_saveat(saveat)


def _is_plain_function(fn) -> bool:
    return isinstance(fn, (types.FunctionType, types.MethodType, ft.partial))


def _closure_convert(fn, t, y, args):
    """Hoist the JAX arrays that `fn(t, y, args)` closes over into a PyTree.

    The backward pass of a `custom_vjp` is traced apart from the forward pass, so
    it must not see tracers that a vector field or `SaveAt.fn` closed over (for
    example diffrax's own `direction` wrapper of `SaveAt.fn`, or a parameter closed
    over inside `jax.jit`). After conversion they are ordinary inputs and, inside
    the terms, receive gradients like any other parameter.
    """
    if not _is_plain_function(fn):
        return fn
    return eqx.filter_closure_convert(fn, t, y, args)


def _convert_terms(terms, t, y, args):
    def convert(term):
        if isinstance(term, diffrax.MultiTerm):
            return diffrax.MultiTerm(*[convert(x) for x in term.terms])
        if isinstance(term, WrapTerm):
            return eqx.tree_at(lambda w: w.term, term, convert(term.term))
        vf = getattr(term, "vector_field", None)
        if vf is not None and _is_plain_function(vf):
            return eqx.tree_at(
                lambda x: x.vector_field, term, _closure_convert(vf, t, y, args)
            )
        return term

    if not isinstance(terms, diffrax.AbstractTerm):
        # e.g. `SemiImplicitEuler`'s `(term_1, term_2)`: each vector field sees only
        # part of the state, so (t, y, args) are not example arguments for it.
        return terms
    return convert(terms)


def _convert_saveat(saveat, t, y, args):
    def convert(sub):
        return eqx.tree_at(lambda s: s.fn, sub, _closure_convert(sub.fn, t, y, args))

    subs = jtu.tree_map(convert, saveat.subs, is_leaf=_is_subsaveat)
    return eqx.tree_at(lambda s: s.subs, saveat, subs)


def _replace_ts(saveat, ts_list):
    def get(s):
        return [sub.ts for sub in jtu.tree_leaves(s.subs, is_leaf=_is_subsaveat)]

    if len(ts_list) == 0:
        return saveat
    return eqx.tree_at(
        lambda s: [x for x in get(s) if x is not None], saveat, ts_list
    )


def _saveat_ts(saveat):
    subs = jtu.tree_leaves(saveat.subs, is_leaf=_is_subsaveat)
    return [sub.ts for sub in subs if sub.ts is not None]


def _checkpointing_outer_loop(
    cond_fun, body_fun, init_val, *, max_steps, buffers, every, checkpoints, out
):
    """diffrax's outer while loop, additionally storing the array leaves of
    `(y, solver_state)` after every `every`-th accepted step in `checkpoints`.

    Checkpoint `j` holds the state after accepted step `(j + 1) * every`. The filled
    buffer is handed back through `out`, as diffrax's loop only returns its own
    state.
    """
    size = jtu.tree_leaves(checkpoints)[0].shape[0]

    def cond(carry):
        return cond_fun(carry[0])

    def body(carry):
        state, ckpts = carry
        new_state = body_fun(state)
        n = new_state.num_accepted_steps
        # Rejected steps leave `num_accepted_steps` unchanged, so each checkpoint is
        # written once, by the step that reaches it.
        pred = (n > state.num_accepted_steps) & (n % every == 0)
        current = eqx.filter((new_state.y, new_state.solver_state), eqx.is_array)

        def write(ckpts_):
            index = jnp.clip(n // every - 1, 0, size - 1)
            return jtu.tree_map(lambda b, x: b.at[index].set(x), ckpts_, current)

        # A `cond`, not a `where`: most steps make no checkpoint.
        ckpts = lax.cond(pred, write, lambda c: c, ckpts)
        return new_state, ckpts

    final_state, ckpts = _outer_loop(
        cond,
        body,
        (init_val, checkpoints),
        max_steps=max_steps,
        buffers=lambda carry: buffers(carry[0]),
        kind="lax",
    )
    out.append(ckpts)
    return final_state


def _forward(
    diff, *, self, init_state, saveat, max_steps, with_checkpoints, **kwargs
):
    # `dt0` (the last entry) is only differentiable: the loop uses the
    # stop-gradiented copy in `kwargs`, and its cotangent comes from `_StepTimes`.
    y0, args, terms, t0, t1, ts_list, _ = diff
    saveat = _replace_ts(saveat, ts_list)
    init_state = eqx.tree_at(lambda s: s.y, init_state, y0)
    init_state = eqx.tree_at(lambda s: s.tprev, init_state, t0)
    del y0
    time_dtype = jnp.result_type(t0)
    record = diffrax.SubSaveAt(steps=True, fn=_record_nothing)
    record_state = SaveState(
        saveat_ts_index=0,
        ts=jnp.full(max_steps, jnp.inf, dtype=time_dtype),
        ys=None,
        save_index=0,
    )
    recording_saveat = diffrax.SaveAt(subs=(saveat.subs, record))
    init_state = eqx.tree_at(
        lambda s: s.save_state,
        init_state,
        (init_state.save_state, record_state),
        is_leaf=_is_none,
    )
    num_checkpoints = _num_checkpoints(self.checkpoint_every, max_steps)
    out = []
    if with_checkpoints and num_checkpoints > 0:
        template = eqx.filter((init_state.y, init_state.solver_state), eqx.is_array)
        checkpoints = jtu.tree_map(
            lambda x: jnp.zeros((num_checkpoints,) + x.shape, x.dtype), template
        )
        outer_while_loop = ft.partial(
            _checkpointing_outer_loop,
            every=self.checkpoint_every,
            checkpoints=checkpoints,
            out=out,
        )
    else:
        outer_while_loop = ft.partial(_outer_loop, kind="lax")
    final_state, aux_stats = self._loop(
        args=args,
        terms=terms,
        saveat=recording_saveat,
        init_state=init_state,
        max_steps=max_steps,
        t0=t0,
        t1=t1,
        inner_while_loop=ft.partial(_inner_loop, kind="lax"),
        outer_while_loop=outer_while_loop,
        **kwargs,
    )
    user_save_state, record_state = final_state.save_state
    final_state = eqx.tree_at(
        lambda s: s.save_state, final_state, user_save_state, is_leaf=_is_none
    )
    checkpoints = out[0] if out else None
    return (final_state, aux_stats), record_state.ts, checkpoints


def _num_checkpoints(checkpoint_every: int | None, max_steps: int) -> int:
    if checkpoint_every is None:
        return 0
    return max_steps // checkpoint_every


@eqx.filter_custom_vjp
def _loop_reversible(diff, **kwargs):
    out, step_times, _ = _forward(diff, with_checkpoints=False, **kwargs)
    return out, step_times


@_loop_reversible.def_fwd
def _loop_reversible_fwd(perturbed, diff, **kwargs):
    del perturbed
    (final_state, aux_stats), step_times, checkpoints = _forward(
        diff, with_checkpoints=True, **kwargs
    )
    residuals = (
        final_state.y,
        final_state.solver_state,
        step_times,
        final_state.num_accepted_steps,
        checkpoints,
    )
    return ((final_state, aux_stats), step_times), residuals


@_loop_reversible.def_bwd
def _loop_reversible_bwd(
    residuals,
    grad_out,
    perturbed,
    diff,
    *,
    self,
    solver,
    stepsize_controller,
    saveat,
    init_state,
    max_steps,
    **kwargs,
):
    del max_steps, kwargs
    y_final, solver_state_final, step_times, num_steps, checkpoints = residuals
    (grad_final_state, _), _ = grad_out
    y0, args, terms, t0, t1, ts_list, dt0 = diff
    _, _, _, t0_perturbed, t1_perturbed, ts_perturbed, dt0_perturbed = perturbed
    saveat = _replace_ts(saveat, ts_list)
    want_times = (
        t0_perturbed
        or t1_perturbed
        or any(jtu.tree_leaves(ts_perturbed))
        or any(jtu.tree_leaves(dt0_perturbed))
    )
    times_map = _StepTimes(_controller_kind(stepsize_controller))
    made_jump0 = init_state.made_jump

    params = (terms, args)
    params_diff, params_static = eqx.partition(params, eqx.is_inexact_array)

    def get_time(n):
        return jnp.where(n == 0, t0, step_times[jnp.maximum(n - 1, 0)])

    # Cotangents of the saved outputs, one per SubSaveAt.
    subs = jtu.tree_leaves(saveat.subs, is_leaf=_is_subsaveat)
    if grad_final_state is None:
        save_states_bar = [None] * len(subs)
    else:
        save_states_bar = jtu.tree_leaves(
            grad_final_state.save_state, is_leaf=_is_save_state
        )
        save_states_bar = [s for s in save_states_bar if _is_save_state(s)]
        if len(save_states_bar) == 0:
            save_states_bar = [None] * len(subs)

    # The forward pass allocated one output buffer per SubSaveAt; their shapes give
    # the cotangents' shapes when an output was not differentiated.
    save_states = jtu.tree_leaves(init_state.save_state, is_leaf=_is_save_state)
    save_states = [s for s in save_states if _is_save_state(s)]
    ys_bars = []
    for save_state, ss_bar in zip(save_states, save_states_bar):
        full = _zeros_like(save_state.ys)
        if ss_bar is None or ss_bar.ys is None:
            ys_bars.append(full)
        else:
            ys_bars.append(_materialise(ss_bar.ys, full))

    def save_vjp(sub, t, y, args_, cotangent):
        """Pull `cotangent` back through `sub.fn(t, y, args)`."""
        (_, vjp_fn) = _vjp(lambda p: sub.fn(p[0], p[1], p[2]), (t, y, args_))
        t_bar, y_bar, a_bar = vjp_fn(cotangent)
        return _materialise(t_bar, t), _materialise(y_bar, y), a_bar

    def select_index(tree, index):
        return jtu.tree_map(lambda x: x[index], tree)

    zero_params_bar = _zeros_like(params_diff)

    def add_args_bar(params_bar, a_bar):
        terms_bar, args_bar = params_bar
        a_bar = _materialise(a_bar, _diff_part(args))
        a_bar = eqx.filter(a_bar, eqx.is_inexact_array)
        return terms_bar, _tree_add(args_bar, a_bar)

    def add_time_bar(tbar, n, value):
        c0, c1, c_dt = times_map.coefficients(n, num_steps, get_time(n), t0, dt0)
        t0_bar, t1_bar, dt0_bar = tbar
        return t0_bar + c0 * value, t1_bar + c1 * value, dt0_bar + c_dt * value

    # Layout of each SubSaveAt's outputs: [t0] [ts...] [steps...] [t1].
    def t1_index_and_pred(sub):
        base = (1 if sub.t0 else 0) + (0 if sub.ts is None else len(sub.ts))
        if sub.steps == 0:
            return base, jnp.asarray(sub.t1)
        saved = num_steps // sub.steps
        if sub.steps == 1:
            pred = jnp.asarray(False)
        else:
            pred = jnp.asarray(sub.t1) & (num_steps % sub.steps != 0)
        return base + saved, pred

    zero_time = jnp.zeros((), dtype=jnp.result_type(t0))
    tbar = (zero_time, zero_time, zero_time)
    ts_bars = [jnp.zeros_like(ts) for ts in ts_list]

    #
    # Cotangents of the outputs saved at t1 (and at the final step).
    #
    ybar = _zeros_like(y_final)
    params_bar = zero_params_bar
    t_final = get_time(num_steps)
    for sub, ys_bar in zip(subs, ys_bars):
        out_size = jtu.tree_leaves(ys_bar)[0].shape[0] if jtu.tree_leaves(ys_bar) else 0
        if out_size == 0:
            continue
        index, pred = t1_index_and_pred(sub)
        index = jnp.minimum(index, out_size - 1)
        cot = jtu.tree_map(
            lambda x: jnp.where(pred, x[index], 0), ys_bar
        )
        t_bar, y_bar, a_bar = save_vjp(sub, t_final, y_final, args, cot)
        ybar = _tree_add(ybar, y_bar)
        params_bar = add_args_bar(params_bar, a_bar)
        tbar = add_time_bar(tbar, num_steps, t_bar)

    def steps_cotangent(n, y, tbar, ybar, params_bar):
        """Cotangents of `SaveAt(steps=k)` outputs saved after accepted step n."""
        t_n = get_time(n)
        for sub, ys_bar in zip(subs, ys_bars):
            if sub.steps == 0:
                continue
            first = 1 if sub.t0 else 0
            pred = (n >= 1) & (n % sub.steps == 0)
            index = first + jnp.maximum(n // sub.steps - 1, 0)
            cot = jtu.tree_map(lambda x: jnp.where(pred, x[index], 0), ys_bar)
            t_bar, y_bar, a_bar = save_vjp(sub, t_n, y, args, cot)
            ybar = _tree_add(ybar, y_bar)
            params_bar = add_args_bar(params_bar, a_bar)
            tbar = add_time_bar(tbar, n, t_bar)
        return tbar, ybar, params_bar

    tbar, ybar, params_bar = steps_cotangent(
        num_steps, y_final, tbar, ybar, params_bar
    )

    ts_subs = [sub for sub in subs if sub.ts is not None]
    ts_ys_bars = [ys_bar for sub, ys_bar in zip(subs, ys_bars) if sub.ts is not None]
    ts_offsets = [1 if sub.t0 else 0 for sub in ts_subs]

    def interp_save(sub, dense_info, t_a, t_b, t_k, args_):
        interp = solver.interpolation_cls(t0=t_a, t1=t_b, **dense_info)
        return sub.fn(t_k, interp.evaluate(t_k), args_)

    def ts_cotangents(m, dense_info, ptrs, ts_bars_, tbar_, params_bar_):
        """Cotangent of the dense info of step m from the `SaveAt(ts=...)` outputs
        that step m interpolated: those with t_m < ts_k <= t_{m+1} (and ts_k = t_0
        on the first step)."""
        t_a = get_time(m)
        t_b = get_time(m + 1)
        dinfo_bar = _zeros_like(_diff_part(dense_info))
        new_ptrs = []
        new_ts_bars = []
        for i, sub in enumerate(ts_subs):
            ts = ts_list[i]
            ys_bar = ts_ys_bars[i]
            offset = ts_offsets[i]

            def cond(carry):
                ptr = carry[0]
                return (ptr > 0) & ((m == 0) | (ts[jnp.maximum(ptr - 1, 0)] > t_a))

            def body(carry):
                ptr, dbar, ts_bar, ta_bar, tb_bar, a_bar_acc = carry
                k = ptr - 1
                cot = select_index(ys_bar, offset + k)
                _, vjp_fn = _vjp(
                    lambda p: interp_save(sub, p[0], p[1], p[2], p[3], p[4]),
                    (dense_info, t_a, t_b, ts[k], args),
                )
                d_b, ta_b, tb_b, tk_b, a_b = vjp_fn(cot)
                dbar = _tree_add(dbar, _materialise(d_b, _diff_part(dense_info)))
                ts_bar = ts_bar.at[k].add(_materialise(tk_b, ts[k]))
                ta_bar = ta_bar + _materialise(ta_b, t_a)
                tb_bar = tb_bar + _materialise(tb_b, t_b)
                a_b = eqx.filter(_materialise(a_b, _diff_part(args)), eqx.is_inexact_array)
                a_bar_acc = _tree_add(a_bar_acc, a_b)
                return ptr - 1, dbar, ts_bar, ta_bar, tb_bar, a_bar_acc

            carry = (
                ptrs[i],
                dinfo_bar,
                ts_bars_[i],
                zero_time,
                zero_time,
                _zeros_like(_diff_part(args)),
            )
            ptr, dinfo_bar, ts_bar, ta_bar, tb_bar, a_bar = lax.while_loop(
                cond, body, carry
            )
            new_ptrs.append(ptr)
            new_ts_bars.append(ts_bar)
            tbar_ = add_time_bar(tbar_, m, ta_bar)
            tbar_ = add_time_bar(tbar_, m + 1, tb_bar)
            params_bar_ = add_args_bar(params_bar_, a_bar)
        return dinfo_bar, new_ptrs, new_ts_bars, tbar_, params_bar_

    #
    # Reconstruct-and-pull-back, one step at a time, from n = N down to 0.
    #

    def reverse_step(m, y1, state1):
        """Reconstruct (y_m, state_m) from (y_{m+1}, state_{m+1}) and return the VJP
        of the forward step m -> m+1."""
        t_a = get_time(m)
        t_b = get_time(m + 1)
        made_jump = jnp.where(m == 0, made_jump0, False)
        if isinstance(solver, Reversible):
            return _reverse_step_fused(
                solver, params_diff, params_static, t_a, t_b, y1, state1,
                want_times, bool(ts_subs),
            )
        terms_, args_ = eqx.combine(params_diff, params_static)
        y0_, dense_info, state0, _ = solver.backward_step(
            terms_, t_a, t_b, y1, args_, state1, made_jump
        )

        def step_fn(p):
            _y, _state, _pdiff, _ta, _tb = p
            _terms, _args = eqx.combine(_pdiff, params_static)
            if not want_times:
                # e.g. `VirtualBrownianTree` refuses to be differentiated in time.
                _ta, _tb = t_a, t_b
            _y1, _, _dinfo, _state1, _ = solver.step(
                _terms, _ta, _tb, _y, _args, _state, made_jump
            )
            return _y1, _dinfo, _state1

        times = (t_a, t_b) if want_times else (None, None)
        (_, dense_info, _), vjp_fn = _vjp(
            step_fn, (y0_, state0, params_diff, *times)
        )

        def pullback(ybar1, sbar1, dinfo_bar):
            ybar0, sbar0, pbar, ta_bar, tb_bar = vjp_fn((ybar1, dinfo_bar, sbar1))
            return ybar0, sbar0, pbar, ta_bar, tb_bar

        return y0_, state0, dense_info, pullback

    sbar = _zeros_like(_diff_part(solver_state_final))
    ptrs = [jnp.asarray(len(ts), dtype=jnp.int32) for ts in ts_list]

    def restore_checkpoint(n, y1, state1, drift):
        """At a checkpoint, measure how far the reconstruction has drifted over the
        segment since the previous one, then continue from the stored state."""
        if checkpoints is None:
            return y1, state1, drift
        every = self.checkpoint_every
        size = jtu.tree_leaves(checkpoints)[0].shape[0]
        # The checkpoint at `num_steps` (if any) equals the final state; skip it.
        pred = (n >= every) & (n % every == 0) & (n < num_steps)
        current, static = eqx.partition((y1, state1), eqx.is_array)

        def restore(operands):
            current_, drift_ = operands
            index = jnp.clip(n // every - 1, 0, size - 1)
            stored = jtu.tree_map(lambda b: b[index], checkpoints)
            drift_ = jnp.maximum(drift_, _relative_drift(current_[0], stored[0]))
            return stored, drift_

        # A `cond`, not a `where`: most steps are not checkpoints.
        current, drift = lax.cond(pred, restore, lambda x: x, (current, drift))
        y1, state1 = eqx.combine(current, static)
        return y1, state1, drift

    def cond_fun(carry):
        return carry[0] > 0

    def body_fun(carry):
        n, y1, state1, ybar1, sbar1, params_bar_, tbar_, ptrs_, ts_bars_, drift = carry
        m = n - 1
        y1, state1, drift = restore_checkpoint(n, y1, state1, drift)
        y0_, state0, dense_info, pullback = reverse_step(m, y1, state1)
        if ts_subs:
            dinfo_bar, ptrs_, ts_bars_, tbar_, params_bar_ = ts_cotangents(
                m, dense_info, ptrs_, ts_bars_, tbar_, params_bar_
            )
        else:
            dinfo_bar = _zeros_like(_diff_part(dense_info))
        ybar0, sbar0, pbar, ta_bar, tb_bar = pullback(ybar1, sbar1, dinfo_bar)
        ybar0 = _materialise(ybar0, y0_)
        sbar0 = _materialise(sbar0, _diff_part(state0))
        params_bar_ = _tree_add(params_bar_, _materialise(pbar, params_diff))
        if want_times:
            tbar_ = add_time_bar(tbar_, m, _materialise(ta_bar, zero_time))
            tbar_ = add_time_bar(tbar_, m + 1, _materialise(tb_bar, zero_time))
        tbar_, ybar0, params_bar_ = steps_cotangent(m, y0_, tbar_, ybar0, params_bar_)
        return (
            m, y0_, state0, ybar0, sbar0, params_bar_, tbar_, ptrs_, ts_bars_, drift
        )

    carry = (
        num_steps,
        y_final,
        solver_state_final,
        ybar,
        sbar,
        params_bar,
        tbar,
        ptrs,
        ts_bars,
        _relative_drift(y0, y0),  # zero, of the right dtype
    )
    carry = lax.while_loop(cond_fun, body_fun, carry)
    _, y0_rec, _, ybar, sbar, params_bar, tbar, ptrs, ts_bars, drift = carry

    # `SaveAt(ts=...)` outputs when t0 == t1: diffrax saves fn(t0, y0, args) there.
    for i, sub in enumerate(ts_subs):
        def cond(c):
            return c[0] > 0

        def body(c, sub=sub, i=i):
            ptr, ybar_, params_bar_, tbar_ = c
            k = ptr - 1
            cot = select_index(ts_ys_bars[i], ts_offsets[i] + k)
            t_bar, y_bar, a_bar = save_vjp(sub, t0, y0, args, cot)
            ybar_ = _tree_add(ybar_, y_bar)
            params_bar_ = add_args_bar(params_bar_, a_bar)
            tbar_ = add_time_bar(tbar_, jnp.asarray(0), t_bar)
            return ptr - 1, ybar_, params_bar_, tbar_

        _, ybar, params_bar, tbar = lax.while_loop(
            cond, body, (ptrs[i], ybar, params_bar, tbar)
        )

    # Outputs saved at t0.
    for sub, ys_bar in zip(subs, ys_bars):
        if sub.t0:
            cot = select_index(ys_bar, 0)
            t_bar, y_bar, a_bar = save_vjp(sub, t0, y0, args, cot)
            ybar = _tree_add(ybar, y_bar)
            params_bar = add_args_bar(params_bar, a_bar)
            tbar = add_time_bar(tbar, jnp.asarray(0), t_bar)

    # The initial solver state is a function of y0 (e.g. z_0 = y_0).
    def init_fn(p):
        _y0, _pdiff, _t0 = p
        _terms, _args = eqx.combine(_pdiff, params_static)
        return solver.init(_terms, _t0, init_state.tnext, _y0, _args)

    _, init_vjp = _vjp(init_fn, (y0, params_diff, t0))
    y_bar, p_bar, t_bar = init_vjp(sbar)
    ybar = _tree_add(ybar, _materialise(y_bar, y0))
    params_bar = _tree_add(params_bar, _materialise(p_bar, params_diff))
    tbar = add_time_bar(tbar, jnp.asarray(0), _materialise(t_bar, t0))

    drift = jnp.maximum(drift, _relative_drift(y0_rec, y0))
    if self.drift_callback is not None:
        jax.debug.callback(self.drift_callback, drift)
    terms_bar, args_bar = params_bar
    t0_bar, t1_bar, dt0_bar = tbar
    if eqx.is_inexact_array(dt0):
        dt0_bar = dt0_bar.astype(jnp.result_type(dt0))
    else:
        dt0_bar = None
    cotangents = (ybar, args_bar, terms_bar, t0_bar, t1_bar, ts_bars, dt0_bar)
    if self.drift_tol is not None:
        # On every cotangent, so that the check survives whichever ones are used.
        cotangents = eqx.error_if(
            cotangents,
            # Also fires on a NaN drift (e.g. an overflowing reconstruction).
            jnp.logical_not(drift <= self.drift_tol),
            "ReversibleAdjoint: the backward pass reconstructed the solution with a "
            f"relative error above drift_tol={self.drift_tol}, so the gradient is "
            "inaccurate. Use `ReversibleAdjoint(checkpoint_every=k)` (see "
            "`revdiffrax.choose_checkpoint_every`), float64, a coupling closer to 1, "
            "or `diffrax.RecursiveCheckpointAdjoint()`.",
        )
    return cotangents


def _reverse_step_fused(
    solver: Reversible,
    params_diff,
    params_static,
    t_a,
    t_b,
    y1,
    state1,
    want_times: bool,
    want_dense: bool,
):
    """Reconstruct-and-pull-back for `Reversible`, fused (DESIGN.md section 3).

    The two base steps that rebuild (y_m, z_m) from (y_{m+1}, z_{m+1}) are exactly
    the ones whose VJPs the adjoint recurrence needs, so they are evaluated once,
    under `jax.vjp`, and their primal outputs are the reconstruction.
    """
    lam = solver.coupling
    z1, base_state = state1

    def psi(u, p, ta, tb, with_dense):
        _pdiff, _ta, _tb = p
        _terms, _args = eqx.combine(_pdiff, params_static)
        if not want_times:
            _ta, _tb = ta, tb
        increment, _, dense_info, _ = solver._base_step(
            _terms, _ta, _tb, u, _args, base_state
        )
        return (increment, dense_info) if with_dense else increment

    # Times are differentiated only when the caller asked for d/dt0, d/dt1 or d/dts.
    times = (t_a, t_b) if want_times else (None, None)

    # B: the backward base step of y_{m+1}, which gives z_m = z_{m+1} + B.
    psi_y, vjp_b = _vjp(
        lambda p: psi(p[0], (p[1], p[2][0], p[2][1]), t_b, t_a, False),
        (y1, params_diff, (times[1], times[0])),
    )
    z0 = _tree_add(z1, psi_y)
    # A: the forward base step of z_m, which gives y_m.
    (psi_z, base_dense_info), vjp_a = _vjp(
        lambda p: psi(p[0], (p[1], p[2][0], p[2][1]), t_a, t_b, True),
        (z0, params_diff, times),
    )
    y0 = solver._reconstruct_y0(y1, z0, psi_z)
    dense_info = solver._dense_info(y0, z0, base_dense_info)

    def pullback(ybar1, sbar1, dinfo_bar):
        zbar1, base_state_bar = sbar1
        # z_{m+1} = z_m - B(y_{m+1})
        yb_b, pbar_b, tbar_b = vjp_b(_tree_scale(zbar1, -1))
        ybar1 = _tree_add(ybar1, _materialise(yb_b, y1))
        # y_{m+1} = lam y_m + (1 - lam) z_m + A(z_m); dense info of y over the step
        ybar0 = _tree_scale(ybar1, lam)
        zbar0 = _tree_add(zbar1, _tree_scale(ybar1, 1 - lam))
        if want_dense:
            offset_bar = dinfo_bar["offset"]
            drift_bar = dinfo_bar["drift"]
            d = jtu.tree_map(lambda o, r: o - (1 - lam) * r, offset_bar, drift_bar)
            ybar0 = _tree_add(ybar0, d)
            zbar0 = _tree_add(zbar0, _tree_scale(d, -1))
            base_bar = dinfo_bar["base"]
        else:
            base_bar = _zeros_like(_diff_part(base_dense_info))
        zb_a, pbar_a, tbar_a = vjp_a((ybar1, base_bar))
        zbar0 = _tree_add(zbar0, _materialise(zb_a, z0))
        pbar = _tree_add(
            _materialise(pbar_a, params_diff), _materialise(pbar_b, params_diff)
        )
        if want_times:
            ta_bar = _materialise(tbar_a[0], t_a) + _materialise(tbar_b[1], t_a)
            tb_bar = _materialise(tbar_a[1], t_b) + _materialise(tbar_b[0], t_b)
        else:
            ta_bar = tb_bar = None
        return ybar0, (zbar0, base_state_bar), pbar, ta_bar, tb_bar

    return y0, (z0, base_state), dense_info, pullback


class ReversibleAdjoint(diffrax.AbstractAdjoint):
    r"""Backpropagate through [`diffrax.diffeqsolve`][] by reconstructing the
    forward solve backwards in time with an algebraically reversible solver.

    The forward pass keeps only the final state and the accepted step times (one
    scalar per step, in a buffer of length `max_steps`). The backward pass rebuilds
    each earlier state from the later one with the solver's `backward_step` and
    pulls the cotangents back through that step. The gradient is the exact gradient
    of the discrete solve (as from [`diffrax.RecursiveCheckpointAdjoint`][]) up to
    floating point, in O(1) memory (plus the step-time buffer) and O(N) time.

    For [`revdiffrax.Reversible`][] the reconstruction and the vector-Jacobian
    products share their base-solver evaluations: with cotangents
    $(\bar y, \bar z)$ of $(y_{n+1}, z_{n+1})$, one backward step is

    $$\bar y \mathrel{-}= (\partial\Psi_{-h}/\partial y)^\top \bar z,\qquad
      \bar z \mathrel{+}= (1 - \lambda)\bar y + (\partial\Psi_h/\partial z)^\top \bar y,
      \qquad \bar y \leftarrow \lambda \bar y,$$

    with parameter cotangents accumulated alongside, so a gradient costs about two
    base steps and two VJPs per step on top of the forward pass.

    Supports gradients with respect to `y0`, `args`, the `terms` (e.g. a neural
    network vector field), `t0`, `t1` and `SaveAt(ts=...)`; all step size
    controllers (with rejected steps); `SaveAt(t0=..., t1=..., ts=..., steps=...,
    fn=...)`; `jax.jit` and `jax.vmap`. Only reverse-mode autodiff is supported.

    The backward pass ends by rebuilding `y0`, which is also known exactly; the
    relative difference $\|\hat y_0 - y_0\|_2 / \|y_0\|_2$ measures how much rounding
    error the reconstruction accumulated, for free.

    Reconstruction amplifies rounding errors (by about `1/coupling` per step for
    [`revdiffrax.Reversible`][], more on chaotic problems), which matters in float32
    over long solves. `checkpoint_every=k` bounds this: the forward pass also stores
    the state `(y, solver_state)` after every k-th accepted step (O(max_steps / k)
    memory), and the backward pass restarts its reconstruction from each stored
    state, so rounding accumulates over at most k steps. The gradient is unchanged
    in exact arithmetic. The drift diagnostic then compares the reconstructed state
    with the stored one at every checkpoint, and reports the largest relative error
    over all segments.

    ??? cite "References"

        ```bibtex
        @article{mccallum2024efficient,
            title={Efficient, Accurate and Stable Gradients for Neural ODEs},
            author={McCallum, Sam and Foster, James},
            journal={arXiv:2410.11648},
            year={2024}
        }

        @article{kidger2021efficient,
            author={Kidger, Patrick and Foster, James and Li, Xuechen and Lyons, Terry},
            title={{E}fficient and {A}ccurate {G}radients for {N}eural {SDE}s},
            year={2021},
            journal={Advances in Neural Information Processing Systems}
        }
        ```
    """

    drift_tol: float | None = None
    drift_callback: Callable[[jax.Array], Any] | None = eqx.field(
        default=None, static=True
    )
    checkpoint_every: int | None = eqx.field(default=None, static=True)

    def __check_init__(self):
        k = self.checkpoint_every
        if k is not None and (
            isinstance(k, bool) or not isinstance(k, int) or k < 1
        ):
            raise ValueError(
                "`checkpoint_every` must be a positive int (store the solver state "
                f"every that many accepted steps) or None, got {k!r}. "
                "`revdiffrax.choose_checkpoint_every` measures a good value."
            )

    def loop(
        self,
        *,
        args,
        terms,
        solver,
        stepsize_controller,
        event,
        saveat,
        t0,
        t1,
        dt0,
        max_steps,
        throw,
        init_state,
        passed_solver_state,
        passed_controller_state,
        progress_meter,
    ):
        del throw, passed_solver_state, passed_controller_state
        _check_inputs(
            solver=solver,
            terms=terms,
            event=event,
            max_steps=max_steps,
            stepsize_controller=stepsize_controller,
            saveat=saveat,
        )
        y0 = init_state.y
        terms = _convert_terms(terms, t0, y0, args)
        saveat = _convert_saveat(saveat, t0, y0, args)
        # Everything the loop depends on other than `diff` is treated as a constant;
        # the dependence of the initial solver state on (y0, args, terms, t0) is
        # re-traced on the backward pass through `solver.init`.
        init_state = eqx.tree_at(lambda s: s.y, init_state, object())
        init_state = jtu.tree_map(
            lambda x: lax.stop_gradient(x) if eqx.is_array(x) else x, init_state
        )
        stepsize_controller = jtu.tree_map(
            lambda x: lax.stop_gradient(x) if eqx.is_array(x) else x,
            stepsize_controller,
        )
        dt0_diff = dt0
        dt0 = None if dt0 is None else lax.stop_gradient(dt0)
        ts_list = _saveat_ts(saveat)
        diff = (y0, args, terms, t0, t1, ts_list, dt0_diff)
        # The differentiable copy of `SaveAt.ts` travels in `diff`.
        saveat = _replace_ts(saveat, [lax.stop_gradient(ts) for ts in ts_list])
        (final_state, aux_stats), _ = _loop_reversible(
            diff,
            self=self,
            solver=solver,
            stepsize_controller=stepsize_controller,
            event=event,
            saveat=saveat,
            dt0=dt0,
            max_steps=max_steps,
            init_state=init_state,
            progress_meter=progress_meter,
        )
        final_state = _only_transpose_ys(final_state)
        return final_state, aux_stats


ReversibleAdjoint.__init__.__doc__ = r"""**Arguments:**

- `drift_tol`: if set, the backward pass raises an error (via `equinox.error_if`,
    so also under `jax.jit`) when the relative reconstruction error of `y0` exceeds
    this value, i.e. when the gradient should not be trusted.
- `drift_callback`: if set, called on the host (via `jax.debug.callback`) with the
    relative reconstruction error of `y0` every time a gradient is computed, e.g.
    `drifts = []; ReversibleAdjoint(drift_callback=drifts.append)`. With
    `checkpoint_every`, this is the largest relative error of the reconstructed `y`
    over all segments between checkpoints (and `y0`).
- `checkpoint_every`: `None` (default) for pure O(1)-memory reconstruction, or a
    positive int k: store the solver state every k accepted steps on the forward
    pass and restart the reconstruction from it on the backward pass, so rounding
    errors accumulate over at most k steps. Costs `max_steps // k` stored states
    (allocated up front, like the step-time buffer) and no extra vector-field
    evaluations. See [`revdiffrax.choose_checkpoint_every`][] to pick k.
"""
