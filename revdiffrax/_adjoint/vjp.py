"""The `custom_vjp` around the solve: `forward` on the way in, `backward` on the way
out; and the refusal of higher-order derivatives."""

import equinox as eqx
import jax.tree_util as jtu

from .._batching import enclosing_vmap_size, vmapped_solves
from .backward import backward
from .forward import DiffInputs, forward


_HIGHER_ORDER_MESSAGE = (
    "`ReversibleAdjoint` computes first derivatives only. Its backward pass rebuilds "
    "the solve from its final state, and JAX cannot differentiate that rebuilt "
    "solve correctly, so second derivatives (`jax.hessian`, "
    "`jax.jacfwd(jax.jacrev(...))`, `jax.jvp` of `jax.grad`, or `jax.grad` of "
    "`jax.grad`) are refused instead of returned wrong. Use "
    "`adjoint=diffrax.DirectAdjoint()`, which supports forward- and reverse-mode "
    "derivatives of any order, for the solve you need them of."
)


@eqx.filter_custom_vjp
def loop_reversible(inputs: DiffInputs, **kwargs):
    out, _ = forward(inputs, with_checkpoints=False, **kwargs)
    return out


@loop_reversible.def_fwd
def _loop_reversible_fwd(perturbed, inputs: DiffInputs, **kwargs):
    diff_times = any(jtu.tree_leaves((perturbed.t0, perturbed.t1, perturbed.dt0)))
    out, residuals = forward(
        inputs, with_checkpoints=True, diff_times=diff_times, **kwargs
    )
    return out, residuals


@eqx.filter_custom_jvp
def _backward_first_order(
    residuals,
    grad_final_state,
    inputs,
    solver,
    stepsize_controller,
    saveat,
    init_state,
    *,
    perturbed,
    adjoint,
):
    """`backward`, behind a `custom_jvp` whose rule refuses to be differentiated.

    Every argument that may hold arrays is positional, so that any differentiation
    of the backward pass reaches the rule below (keyword arguments are treated as
    constants)."""
    return backward(
        residuals,
        grad_final_state,
        perturbed,
        inputs,
        adjoint=adjoint,
        solver=solver,
        stepsize_controller=stepsize_controller,
        saveat=saveat,
        init_state=init_state,
    )


@_backward_first_order.def_jvp
def _refuse_higher_order(primals, tangents, **kwargs):
    del primals, tangents, kwargs
    raise NotImplementedError(_HIGHER_ORDER_MESSAGE)


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
    **kwargs,
):
    del kwargs
    grad_final_state, _ = grad_out
    # Under `jax.vmap` this function runs batched, but the backward loop is traced
    # with one solve's shapes: record how many solves it pulls back at once, for
    # the decisions taken from shapes (`use_stage_pullback`).
    with vmapped_solves(enclosing_vmap_size()):
        return _backward_first_order(
            residuals,
            grad_final_state,
            inputs,
            solver,
            stepsize_controller,
            saveat,
            init_state,
            perturbed=perturbed,
            adjoint=adjoint,
        )
