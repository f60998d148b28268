"""Second derivatives through `ReversibleAdjoint`: forward-over-reverse ones are
right (they once came out wrong: `jax.hessian` gave a diagonal of 0.9128 where
finite differences and `DirectAdjoint` give 0.1939, because the initial solver
state z_0 = y_0 lost its tangent), reverse-over-reverse ones are refused with a
clear error, and first derivatives are unchanged. `test_hvp.py` covers the solvers,
controllers and outputs."""

import diffrax
import jax
import jax.numpy as jnp
import pytest
import revdiffrax
from helpers import GRAD_RTOL, tree_rel_err


def _loss(y0, adjoint):
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, args: -y),
        revdiffrax.Reversible(diffrax.Euler()),
        0.0,
        1.0,
        0.1,
        y0,
        adjoint=adjoint,
    )
    assert sol.ys is not None
    return jnp.sum(sol.ys[-1] ** 2)


def _jvp_of_grad(f):
    def jvp_of_grad(y0, adjoint):
        grad = jax.grad(f)
        return jax.jvp(lambda y: grad(y, adjoint), (y0,), (jnp.ones_like(y0),))

    return jvp_of_grad


FORWARD_OVER_REVERSE = {
    "hessian": jax.hessian,
    "jacfwd(jacrev)": lambda f: jax.jacfwd(jax.jacrev(f)),
    "jvp(grad)": _jvp_of_grad,
}
REVERSE_OVER_REVERSE = {
    "grad(grad)": lambda f: jax.grad(lambda y, a: jnp.sum(jax.grad(f)(y, a))),
    "jacrev(jacrev)": lambda f: jax.jacrev(jax.jacrev(f)),
}


@pytest.mark.parametrize("name", list(FORWARD_OVER_REVERSE))
def test_forward_over_reverse_matches_finite_differences(name):
    y0 = jnp.array([1.0, 2.0])
    second = FORWARD_OVER_REVERSE[name](_loss)
    ours = second(y0, revdiffrax.ReversibleAdjoint())
    reference = second(y0, diffrax.DirectAdjoint())
    assert tree_rel_err(ours, reference) < GRAD_RTOL
    hessian = jax.hessian(_loss)(y0, diffrax.DirectAdjoint())
    eps = 1e-6
    for i in range(2):
        e = jnp.zeros(2).at[i].set(eps)
        g_plus = jax.grad(_loss)(y0 + e, revdiffrax.ReversibleAdjoint())
        g_minus = jax.grad(_loss)(y0 - e, revdiffrax.ReversibleAdjoint())
        assert jnp.allclose(hessian[i], (g_plus - g_minus) / (2 * eps), atol=1e-8)


@pytest.mark.parametrize("name", list(REVERSE_OVER_REVERSE))
def test_reverse_over_reverse_is_refused(name):
    y0 = jnp.array([1.0, 2.0])
    second = REVERSE_OVER_REVERSE[name](_loss)
    with pytest.raises(
        RuntimeError, match=r"forward-over-reverse mode only.*DirectAdjoint"
    ):
        second(y0, revdiffrax.ReversibleAdjoint())
    # The recommended replacement works.
    assert jnp.all(jnp.isfinite(second(y0, diffrax.DirectAdjoint())))


def test_first_derivative_unchanged():
    y0 = jnp.array([1.0, 2.0])
    grad = jax.grad(_loss)(y0, revdiffrax.ReversibleAdjoint())
    expected = jax.grad(_loss)(y0, diffrax.RecursiveCheckpointAdjoint())
    assert jnp.allclose(grad, expected, rtol=1e-12, atol=0)
    grads = jax.vmap(jax.grad(_loss), in_axes=(0, None))(
        jnp.stack([y0, 2 * y0]), revdiffrax.ReversibleAdjoint()
    )
    assert jnp.allclose(grads[1], 2 * expected, rtol=1e-12, atol=0)
