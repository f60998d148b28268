"""Second derivatives through `ReversibleAdjoint` are refused with a clear error
(they used to come out wrong: `jax.hessian` gave a diagonal of 0.9128 where finite
differences and `DirectAdjoint` give 0.1939), while first derivatives are unchanged."""

import diffrax
import jax
import jax.numpy as jnp
import pytest
import revdiffrax


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


SECOND_DERIVATIVES = {
    "hessian": jax.hessian,
    "jacfwd(jacrev)": lambda f: jax.jacfwd(jax.jacrev(f)),
    "jvp(grad)": _jvp_of_grad,
    "grad(grad)": lambda f: jax.grad(lambda y, a: jnp.sum(jax.grad(f)(y, a))),
    "jacrev(jacrev)": lambda f: jax.jacrev(jax.jacrev(f)),
}


@pytest.mark.parametrize("name", list(SECOND_DERIVATIVES))
def test_second_derivatives_are_refused(name):
    y0 = jnp.array([1.0, 2.0])
    second = SECOND_DERIVATIVES[name](_loss)
    with pytest.raises(
        NotImplementedError, match=r"first derivatives only.*DirectAdjoint"
    ):
        second(y0, revdiffrax.ReversibleAdjoint())
    # The recommended replacement gives the finite-difference Hessian.
    if name == "hessian":
        hessian = second(y0, diffrax.DirectAdjoint())
        eps = 1e-6
        for i in range(2):
            e = jnp.zeros(2).at[i].set(eps)
            g_plus = jax.grad(_loss)(y0 + e, diffrax.DirectAdjoint())
            g_minus = jax.grad(_loss)(y0 - e, diffrax.DirectAdjoint())
            assert jnp.allclose(hessian[i], (g_plus - g_minus) / (2 * eps), atol=1e-8)


def test_first_derivative_unchanged():
    y0 = jnp.array([1.0, 2.0])
    grad = jax.grad(_loss)(y0, revdiffrax.ReversibleAdjoint())
    expected = jax.grad(_loss)(y0, diffrax.RecursiveCheckpointAdjoint())
    assert jnp.allclose(grad, expected, rtol=1e-12, atol=0)
    grads = jax.vmap(jax.grad(_loss), in_axes=(0, None))(
        jnp.stack([y0, 2 * y0]), revdiffrax.ReversibleAdjoint()
    )
    assert jnp.allclose(grads[1], 2 * expected, rtol=1e-12, atol=0)
