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
