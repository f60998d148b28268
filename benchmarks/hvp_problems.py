"""The small problems whose Hessian-vector products are checked, shared by
`tests/test_hvp.py` and `benchmarks/hvp_accuracy.py`: a neural ODE
`y' = tanh(mlp(y)) cos t - a y` (y in R^2, t in [0, 1.5], dt0 = 0.1) with parameters
`(y0, a, mlp)`, its partitioned form for `SemiImplicitEuler`, an SDE with diagonal
noise and a CDE driven by the interpolation of data; each with a tangent in every
input. Losses are `loss(params, adjoint, *config)`."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import revdiffrax


# Made at import in float64 (the tests enable it too).
jax.config.update("jax_enable_x64", True)

# Two exact adjoints of the same discrete solve agree to this in float64.
RTOL = 1e-9
# 15 constant steps; 10 to 30 adaptive ones. A small `max_steps` keeps
# `DirectAdjoint`'s nested loops (and so the compilation) small.
T1, DT0, MAX_CONSTANT_STEPS, MAX_ADAPTIVE_STEPS = 1.5, 0.1, 16, 64
TS = jnp.array([0.1, 0.37, 0.9, 1.2, 1.5])
SAVEATS = {
    "t1": diffrax.SaveAt(t1=True),
    "ts": diffrax.SaveAt(ts=TS),
    "steps": diffrax.SaveAt(steps=True),
}
ALF = revdiffrax.AsynchronousLeapfrog()


class Field(eqx.Module):
    """A small neural vector field with a scalar rate in `args`."""

    mlp: eqx.nn.MLP

    def __call__(self, t, y, args):
        return jnp.tanh(self.mlp(y)) * jnp.cos(t) - args * y


def random_like(tree, key):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jr.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [jr.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    )


MLP = eqx.nn.MLP(2, 2, 4, 1, activation=jnp.tanh, key=jr.PRNGKey(0))
PARAMS, STATIC = eqx.partition(
    (jnp.array([0.6, -0.4]), jnp.array(0.5), MLP), eqx.is_inexact_array
)
# A tangent in y0, args and every parameter of the vector field.
TANGENT = random_like(PARAMS, jr.PRNGKey(1))
# The partitioned system's parameters: y0 = (q0, p0).
PARAMS_QP, STATIC_QP = eqx.partition(
    ((jnp.array([0.6, -0.4]), jnp.array([0.3, 0.2])), jnp.array(0.5), MLP),
    eqx.is_inexact_array,
)
TANGENT_QP = random_like(PARAMS_QP, jr.PRNGKey(1))


def pid(rtol: float) -> diffrax.PIDController:
    return diffrax.PIDController(rtol=rtol, atol=1e-2 * rtol)


def ode_loss(params, adjoint, solver, controller, saveat, max_steps=None):
    """A loss of the saved states of the neural ODE (of the partitioned system if
    `params` holds `(q0, p0)`). `max_steps`: by default just enough for the
    controller."""
    if max_steps is None:
        constant = isinstance(controller, diffrax.ConstantStepSize)
        max_steps = MAX_CONSTANT_STEPS if constant else MAX_ADAPTIVE_STEPS
    partitioned = isinstance(params[0], tuple)
    y0, a, mlp = eqx.combine(params, STATIC_QP if partitioned else STATIC)
    if partitioned:
        terms = (
            diffrax.ODETerm(lambda t, p, a: jnp.tanh(mlp(p)) * jnp.cos(t)),
            diffrax.ODETerm(lambda t, q, a: -a * q),
        )
    else:
        terms = diffrax.ODETerm(Field(mlp))
    sol = diffrax.diffeqsolve(
        terms, solver, 0.0, T1, DT0, y0, args=a, saveat=saveat,
        stepsize_controller=controller, adjoint=adjoint, max_steps=max_steps,
    )  # fmt: skip
    assert sol.ys is not None
    # Unused `steps` slots hold inf; they are not part of the loss.
    return sum(
        jnp.sum(jnp.where(jnp.isfinite(ys), jnp.sin(ys) ** 2, 0.0))
        for ys in jax.tree_util.tree_leaves(sol.ys)
    )


def sde_loss(params, adjoint, solver, levy_area=diffrax.SpaceTimeLevyArea, key=None):
    """A loss of an SDE with diagonal noise driven by a `VirtualBrownianTree`.
    `levy_area` and `key` (default `jr.PRNGKey(2)`) make its Brownian motion:
    solvers that need only increments can take `diffrax.BrownianIncrement` and an
    `unsafe_rbg` key, which compile faster (the tree's evaluations dominate)."""
    y0, a = params
    bm = diffrax.VirtualBrownianTree(
        0.0, 1.0, tol=1e-3, shape=(2,), levy_area=levy_area,
        key=jr.PRNGKey(2) if key is None else key,
    )  # fmt: skip

    def diffusion(t, y, a):
        return lx.DiagonalLinearOperator(0.3 * jnp.sin(a * y))

    terms = diffrax.MultiTerm(
        diffrax.ODETerm(lambda t, y, a: -a * y**3), diffrax.ControlTerm(diffusion, bm)
    )
    sol = diffrax.diffeqsolve(
        terms, solver, 0.0, 1.0, 0.1, y0, args=a, adjoint=adjoint,
        saveat=diffrax.SaveAt(ts=jnp.linspace(0.0, 1.0, 4)), max_steps=16,
    )  # fmt: skip
    assert sol.ys is not None
    return jnp.sum(jnp.cos(sol.ys))


SDE_PARAMS = (jnp.array([0.8, -0.5]), jnp.array(0.7))
SDE_TANGENT = (jnp.array([0.3, 1.0]), jnp.array(-0.6))


def cde_loss(params, adjoint, solver):
    """A loss of a CDE driven by the linear interpolation of the data `xs`."""
    xs, a = params
    ts = jnp.linspace(0.0, 1.0, xs.shape[0])
    path = diffrax.LinearInterpolation(ts, xs)
    term = diffrax.ControlTerm(lambda t, y, a: jnp.tanh(a * jnp.outer(y, y)), path)
    sol = diffrax.diffeqsolve(
        term, solver, 0.0, 1.0, 0.1, jnp.array([0.5, 1.0]), args=a,
        adjoint=adjoint, max_steps=16,
    )  # fmt: skip
    assert sol.ys is not None
    return jnp.sum(sol.ys**2)


_CDE_TS = jnp.linspace(0.0, 1.0, 6)
CDE_PARAMS = (jnp.stack([_CDE_TS, jnp.sin(6 * _CDE_TS)], -1), jnp.array(0.7))
CDE_TANGENT = (jr.normal(jr.PRNGKey(3), CDE_PARAMS[0].shape), jnp.array(1.0))


def hvp(loss, params, tangent, adjoint, *args):
    """The gradient of `loss` at `params` and its derivative along `tangent`."""
    grad = jax.grad(lambda p: loss(p, adjoint, *args))
    return jax.jit(lambda p, v: jax.jvp(grad, (p,), (v,)))(params, tangent)
