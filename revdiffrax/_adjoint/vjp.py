"""The `custom_vjp` around the solve: `forward` on the way in, `backward` on the way
out; what of higher-order differentiation is supported, and the refusal of the
rest.

Forward-over-reverse (`jax.jvp` of `jax.grad`, `jax.hessian` = `jax.jacfwd` of
`jax.jacrev`) works by JAX's own rules: under an outer `jax.jvp` the forward pass
runs on tangent-carrying inputs, so its residuals (y_N, the solver state at t_N)
carry their tangents, and the backward pass, which is ordinary traceable code,
rebuilds the states together with their tangents while pulling the cotangents
back. Memory stays O(1) in the number of steps: the tangents are reconstructed, not
stored. Reverse-over-reverse would need the transpose of the backward loop (a
`while_loop`), and is refused with `_REVERSE_OVER_REVERSE_MESSAGE`."""

import functools as ft

import equinox as eqx
import equinox.internal as eqxi
import jax.tree_util as jtu

from .._batching import enclosing_vmap_size, vmapped_solves
from .backward import backward
from .batched_outputs import batch_like_inputs
from .forward import DiffInputs, forward
from .refusals import refuse_tangents


_REVERSE_OVER_REVERSE_MESSAGE = (
    "`ReversibleAdjoint` supports second derivatives in forward-over-reverse mode "
    "only: `jax.jvp(jax.grad(loss), (params,), (v,))` (Hessian-vector products), "
    "`jax.hessian` or `jax.jacfwd(jax.jacrev(...))`. Reverse-over-reverse "
    "(`jax.grad` of `jax.grad`, `jax.jacrev` of `jax.jacrev`) would differentiate "
    "its backward loop in reverse mode, which JAX cannot do. Use one of the "
    "forward-over-reverse forms above, or `adjoint=diffrax.DirectAdjoint()`, which "
    "supports derivatives of any order in any mode."
)

_TIME_TANGENT_MESSAGE = (
    "`ReversibleAdjoint` computes second derivatives (forward-over-reverse: "
    "`jax.jvp` of `jax.grad`, `jax.hessian`) with respect to `y0`, `args` and the "
    "parameters of the terms only, not with respect to `t0`, `t1`, `dt0` or "
    "`SaveAt(ts=...)`: a tangent reached one of these. Keep the times out of the "
    "outer differentiation (e.g. `jax.lax.stop_gradient` them, or close over "
    "constants), or use `adjoint=diffrax.DirectAdjoint()` for second derivatives "
    "with respect to times."
)

_EVENT_TANGENT_MESSAGE = (
    "`ReversibleAdjoint` does not compute second derivatives (forward-over-reverse: "
    "`jax.jvp` of `jax.grad`, `jax.hessian`) of solves with an `event`. Use "
    "`adjoint=diffrax.DirectAdjoint()` for these."
)


def _refuse_outer_tangents(tangents: DiffInputs, *, has_event: bool) -> str | None:
    """Which tangents of an outer forward-mode differentiation (forward-over-reverse)
    the backward pass does not carry correctly: those of the times, and any with an
    event."""
    if jtu.tree_leaves((tangents.t0, tangents.t1, tangents.dt0, tangents.ts)):
        return _TIME_TANGENT_MESSAGE
    if has_event and jtu.tree_leaves(tangents):
        return _EVENT_TANGENT_MESSAGE
    return None


def _batched_like(out, dynamic: DiffInputs):
    """The saved outputs made to depend on every input, so that under `jax.vmap`
    no output is unbatched while an input is (its cotangent would reach every
    sample's backward pass whole: `batched_outputs.py`). The primal and the forward
    rule must agree on which outputs are batched."""
    final_state, aux_stats = out
    save_state = batch_like_inputs(final_state.save_state, dynamic)
    return eqx.tree_at(lambda s: s.save_state, final_state, save_state), aux_stats


@eqx.filter_custom_vjp
def loop_reversible(inputs: DiffInputs, **kwargs):
    out, _ = forward(inputs, with_checkpoints=False, **kwargs)
    return _batched_like(out, eqx.filter(inputs, eqx.is_array))


@loop_reversible.def_fwd
def _loop_reversible_fwd(perturbed, inputs: DiffInputs, **kwargs):
    dynamic, static = eqx.partition(inputs, eqx.is_array)
    refuse = ft.partial(
        _refuse_outer_tangents, has_event=kwargs.get("event") is not None
    )
    # Called in the forward pass, so differentiated only by an outer forward-mode
    # differentiation.
    dynamic = refuse_tangents(dynamic, refuse=refuse)
    inputs = eqx.combine(dynamic, static)
    diff_times = any(jtu.tree_leaves((perturbed.t0, perturbed.t1, perturbed.dt0)))
    out, residuals = forward(
        inputs, with_checkpoints=True, diff_times=diff_times, **kwargs
    )
    return _batched_like(out, dynamic), residuals


@loop_reversible.def_bwd
def _loop_reversible_bwd(
    residuals,
    grad_out,
    perturbed,
    inputs: DiffInputs,
    *,
    adjoint,
    solver,
    stepsize_controller,
    saveat,
    init_state,
    measured=None,
    **kwargs,
):
    del kwargs
    grad_final_state, _ = grad_out
    # Under `jax.vmap` this function runs batched, but the backward loop is traced
    # with one solve's shapes: record how many solves it pulls back at once, for
    # the decisions taken from shapes (`use_stage_pullback`).
    with vmapped_solves(enclosing_vmap_size()):
        cotangents = backward(
            residuals,
            grad_final_state,
            perturbed,
            inputs,
            adjoint=adjoint,
            solver=solver,
            stepsize_controller=stepsize_controller,
            saveat=saveat,
            init_state=init_state,
            measured=measured,
        )
    # Forward mode through the backward pass is fine (its JVP is the identity on
    # the tangents); transposing it (reverse-over-reverse) raises the message.
    return eqxi.nondifferentiable_backward(
        cotangents, msg=_REVERSE_OVER_REVERSE_MESSAGE
    )
