"""The default drift and parasitic-mode checks add no work that grows with the
outputs (issue 22): with 1,000 `SaveAt(ts)` times the drift check once kept the
cotangent of the (undifferentiated) saved times alive, updated on every backward
step, and made the gradient 3x slower; the parasitic check added a zero to every
saved state. Compared structurally, by the compiled gradient's flop count."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import revdiffrax
from revdiffrax._adjoint.measured import measured_leaves


def _flops(adjoint: revdiffrax.ReversibleAdjoint, num_ts: int) -> float:
    mlp = eqx.nn.MLP(3, 2, 4, 1, activation=jnp.tanh, key=jax.random.PRNGKey(0))
    params, static = eqx.partition(mlp, eqx.is_array)
    ts = jnp.linspace(0.0, 1.0, num_ts)

    def vector_field(t, y, params):
        model = eqx.combine(params, static)
        return model(jnp.concatenate([jnp.atleast_1d(t), y]))

    def loss(params):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(vector_field),
            revdiffrax.Reversible(diffrax.Heun()),
            0.0,
            1.0,
            0.02,
            jnp.array([1.0, 0.5]),
            args=params,
            saveat=diffrax.SaveAt(ts=ts),
            adjoint=adjoint,
            max_steps=50,
        )
        assert sol.ys is not None
        return jnp.sum(sol.ys**2)

    compiled = jax.jit(jax.grad(loss)).lower(params).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"])


def test_default_checks_add_no_work_per_saved_time():
    unchecked = revdiffrax.ReversibleAdjoint(drift_tol=None, parasitic_tol=None)
    extra = {
        num_ts: _flops(revdiffrax.ReversibleAdjoint(), num_ts)
        - _flops(unchecked, num_ts)
        for num_ts in (10, 200)
    }
    # A few comparisons and norms of the state, the same however many times are
    # saved (before the fix: 382 more flops at 10 times, 1,852 at 500).
    assert extra[200] == extra[10]
    assert 0 <= extra[10] < 100


def _cnf_field(static):
    """A CNF's `(x, log p)` field on a batch inside the state, the trace exact
    (reverse mode over the rows of the identity): the log-density is read by
    nothing."""

    def vector_field(t, y, params):
        model = eqx.combine(params, static)
        x, _ = y

        def one(xi):
            dx, vjp = jax.vjp(model, xi)
            (jac,) = jax.vmap(vjp)(jnp.eye(xi.shape[0], dtype=xi.dtype))
            return dx, -jnp.trace(jac)

        return jax.vmap(one)(x)

    return vector_field


def _cnf_flops(adjoint: revdiffrax.ReversibleAdjoint) -> float:
    mlp = eqx.nn.MLP(2, 2, 8, 2, activation=jnp.tanh, key=jax.random.PRNGKey(0))
    params, static = eqx.partition(mlp, eqx.is_array)
    y0 = (jax.random.normal(jax.random.PRNGKey(1), (4, 2)), jnp.zeros(4))

    def loss(params):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(_cnf_field(static)),
            revdiffrax.Reversible(diffrax.Dopri5(), stage_pullback=True),
            0.0,
            1.0,
            0.1,
            y0,
            args=params,
            adjoint=adjoint,
            max_steps=10,
        )
        x, delta_logp = sol.ys  # pyright: ignore[reportGeneralTypeIssues]
        return jnp.sum(x**2) + jnp.sum(delta_logp)

    compiled = jax.jit(jax.grad(loss)).lower(params).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"])


def test_default_checks_keep_unread_leaves_dead():
    # Before the fix the checks measured the log-density too, whose reconstruction
    # (and, under `jax.grad`, forward evaluation) needs the trace's Jacobian at
    # every stage, which XLA otherwise removes: +83% flops (39,098 -> 71,757).
    unchecked = _cnf_flops(
        revdiffrax.ReversibleAdjoint(drift_tol=None, parasitic_tol=None)
    )
    extra = _cnf_flops(revdiffrax.ReversibleAdjoint()) - unchecked
    assert 0 <= extra < 0.01 * unchecked


def test_measured_leaves():
    mlp = eqx.nn.MLP(2, 2, 4, 1, key=jax.random.PRNGKey(0))
    params, static = eqx.partition(mlp, eqx.is_array)
    solver = revdiffrax.Reversible(diffrax.Heun())
    terms = diffrax.ODETerm(_cnf_field(static))
    y0 = (jnp.ones((3, 2)), jnp.zeros(3))

    def measured(*fns):
        return measured_leaves(solver, terms, 0.0, y0, params, list(fns), False)

    def identity(t, y, args):
        return y

    def square_of_logp(t, y, args):
        return y[1] ** 2

    def logp_only(t, y, args):
        return 2 * y[1]

    assert measured() == (True, False)
    # The default `SaveAt.fn` and a linear one do not read the log-density's value;
    # a nonlinear one does (its pullback needs it), and then everything is measured.
    assert measured(identity, logp_only) == (True, False)
    assert measured(identity, square_of_logp) is None
    # With an event, whose conditions are not analysed: everything.
    assert measured_leaves(solver, terms, 0.0, y0, params, [], True) is None
