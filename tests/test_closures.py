"""Closure conversion: values that `SaveAt.fn` or the vector fields of a tuple of
terms close over receive the gradients `RecursiveCheckpointAdjoint` gives them."""

import diffrax
import jax
import jax.numpy as jnp
import revdiffrax
from helpers import GRAD_RTOL, RCA_ALL_STEPS, tree_rel_err


RCA = RCA_ALL_STEPS
REV = revdiffrax.ReversibleAdjoint()


def _saveat_loss(p, y0, adjoint):
    # A learned observation function, closed over in every kind of output.
    def observe(t, y, args):
        return jnp.tanh(p[0] * y + p[1] * t)

    saveat = diffrax.SaveAt(
        subs=[
            diffrax.SubSaveAt(ts=jnp.array([0.0, 0.3, 0.7]), fn=observe),
            diffrax.SubSaveAt(t0=True, t1=True, steps=2, fn=lambda t, y, a: p[2] * y),
            diffrax.SubSaveAt(t1=True),
        ]
    )
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, a: -a * y + jnp.sin(t) * y**2),
        revdiffrax.Reversible(diffrax.Tsit5()),
        0.0,
        1.0,
        0.1,
        y0,
        args=0.7,
        saveat=saveat,
        adjoint=adjoint,
        max_steps=20,
    )
    ys = jax.tree_util.tree_leaves(sol.ys)
    return sum(jnp.sum(jnp.where(jnp.isfinite(x), jnp.sin(x), 0.0)) for x in ys)


def test_saveat_fn_closing_over_parameters():
    p, y0 = jnp.array([1.3, -0.4, 0.8]), jnp.array([1.0, 0.5])
    grad = jax.jit(jax.grad(_saveat_loss, argnums=(0, 1)), static_argnums=2)
    g_rev, g_rca = grad(p, y0, REV), grad(p, y0, RCA)
    assert float(jnp.min(jnp.abs(g_rca[0]))) > 1e-2
    assert tree_rel_err(g_rev, g_rca) < GRAD_RTOL


def _tuple_loss(p, y0, adjoint):
    # A forced pendulum whose parameters are closed over by both vector fields.
    terms = (
        diffrax.ODETerm(lambda t, v, args: p[0] * v),
        diffrax.ODETerm(lambda t, q, args: -p[1] * jnp.sin(q) + args * jnp.cos(t)),
    )
    sol = diffrax.diffeqsolve(
        terms,
        revdiffrax.SemiImplicitEuler(),
        0.0,
        2.0,
        0.05,
        y0,
        args=0.2,
        saveat=diffrax.SaveAt(ts=jnp.array([0.5, 1.5, 2.0])),
        adjoint=adjoint,
        max_steps=50,
    )
    q, v = sol.ys
    return jnp.sum(q**2) + jnp.sum(jnp.cos(v))


def test_tuple_of_terms_closing_over_parameters():
    p = jnp.array([1.1, 0.9])
    y0 = (jnp.array([0.3, -1.2]), jnp.array([1.0, 0.5]))
    grad = jax.jit(jax.grad(_tuple_loss, argnums=(0, 1)), static_argnums=2)
    g_rev, g_rca = grad(p, y0, REV), grad(p, y0, RCA)
    assert float(jnp.min(jnp.abs(g_rca[0]))) > 1e-2
    assert tree_rel_err(g_rev, g_rca) < GRAD_RTOL
