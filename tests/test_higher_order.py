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


REV = revdiffrax.ReversibleAdjoint()
DIRECT = diffrax.DirectAdjoint()
Y0 = jnp.array([1.0, 2.0])


@pytest.mark.parametrize("name", list(FORWARD_OVER_REVERSE))
def test_forward_over_reverse_matches_direct_adjoint(name):
    # Both adjoints in one jitted program: one compilation instead of the many small
    # ones of an eager second derivative. That `DirectAdjoint`'s Hessian is the true
    # one is checked once, for every transform, by
    # `test_direct_hessian_matches_finite_differences`.
    second = FORWARD_OVER_REVERSE[name](_loss)
    ours, reference = jax.jit(lambda y: (second(y, REV), second(y, DIRECT)))(Y0)
    assert tree_rel_err(ours, reference) < GRAD_RTOL


def test_direct_hessian_matches_finite_differences():
    # The reference of `test_forward_over_reverse_matches_direct_adjoint` against
    # central differences of our first derivative (the same for every transform, so
    # checked once).
    hessian = jax.jit(jax.hessian(_loss), static_argnums=1)(Y0, DIRECT)
    grad = jax.jit(jax.grad(_loss), static_argnums=1)
    eps = 1e-6
    for i in range(2):
        e = jnp.zeros(2).at[i].set(eps)
        g_plus, g_minus = grad(Y0 + e, REV), grad(Y0 - e, REV)
        assert jnp.allclose(hessian[i], (g_plus - g_minus) / (2 * eps), atol=1e-8)


@pytest.mark.parametrize("name", list(REVERSE_OVER_REVERSE))
def test_reverse_over_reverse_is_refused(name):
    second = REVERSE_OVER_REVERSE[name](_loss)
    with pytest.raises(
        RuntimeError, match=r"forward-over-reverse mode only.*DirectAdjoint"
    ):
        second(Y0, REV)
    # The recommended replacement works (jitted: one compilation).
    assert jnp.all(jnp.isfinite(jax.jit(second, static_argnums=1)(Y0, DIRECT)))


def test_first_derivative_unchanged():
    rca = diffrax.RecursiveCheckpointAdjoint()
    grad = jax.jit(jax.grad(_loss), static_argnums=1)
    expected = grad(Y0, rca)
    assert jnp.allclose(grad(Y0, REV), expected, rtol=1e-12, atol=0)
    grads = jax.jit(jax.vmap(jax.grad(_loss), in_axes=(0, None)), static_argnums=1)(
        jnp.stack([Y0, 2 * Y0]), REV
    )
    assert jnp.allclose(grads[1], 2 * expected, rtol=1e-12, atol=0)
