"""The `custom_vjp` around the solve: `forward` on the way in, `backward` on the way
out."""

import equinox as eqx

from .backward import backward
from .forward import DiffInputs, forward


@eqx.filter_custom_vjp
def loop_reversible(inputs: DiffInputs, **kwargs):
    out, _ = forward(inputs, with_checkpoints=False, **kwargs)
    return out


@loop_reversible.def_fwd
def _loop_reversible_fwd(perturbed, inputs: DiffInputs, **kwargs):
    del perturbed
    out, residuals = forward(inputs, with_checkpoints=True, **kwargs)
    return out, residuals


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
