"""revdiffrax solvers inside diffrax.diffeqsolve: adaptive stepping, FSAL handling,
and compatibility with diffrax's adjoints under jit / grad / vmap."""

import copy

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest
import revdiffrax
from helpers import RCA_ALL_STEPS


# y' = A y, rotation with decay: y(t) = exp(-0.1 t) Rot(2 t) y0.
_A = jnp.array([[-0.1, 2.0], [-2.0, -0.1]])
_Y0 = jnp.array([1.0, 0.5])


def _linear_exact(t):
    c, s = jnp.cos(2 * t), jnp.sin(2 * t)
    return jnp.exp(-0.1 * t) * (jnp.array([[c, s], [-s, c]]) @ _Y0)


def _linear_term():
    return diffrax.ODETerm(lambda t, y, args: _A @ y)


def test_adaptive_tsit5():
    ts = jnp.linspace(0.0, 10.0, 21)

    def solve(solver):
        sol = diffrax.diffeqsolve(
            _linear_term(),
            solver,
            0.0,
            10.0,
            None,
            _Y0,
            saveat=diffrax.SaveAt(ts=ts),
            stepsize_controller=diffrax.PIDController(rtol=1e-6, atol=1e-6),
        )
        assert sol.result == diffrax.RESULTS.successful
        err = float(jnp.max(jnp.abs(sol.ys - jax.vmap(_linear_exact)(ts))))
        return (
            err,
            int(sol.stats["num_accepted_steps"]),
            int(sol.stats["num_rejected_steps"]),
        )

    err, steps, rejected = solve(revdiffrax.Reversible(diffrax.Tsit5()))
    err_plain, steps_plain, _ = solve(diffrax.Tsit5())
    print(
        f"\nADAPTIVE Reversible(Tsit5) err={err:.2e} steps={steps}+{rejected} rejected;"
        f" Tsit5 err={err_plain:.2e} steps={steps_plain}"
    )
    assert err < 1e-4 * float(jnp.max(jnp.abs(_Y0)))
    assert err < 10 * err_plain + 1e-6
    assert steps_plain / 3 <= steps <= 3 * steps_plain


def test_adaptive_rejects_and_recovers():
    # A far too large initial step must be rejected by the base error estimate,
    # with the rejected step leaving no trace in the solution.
    sol = diffrax.diffeqsolve(
        _linear_term(),
        revdiffrax.Reversible(diffrax.Tsit5()),
        0.0,
        3.0,
        2.0,
        _Y0,
        stepsize_controller=diffrax.PIDController(rtol=1e-8, atol=1e-8),
    )
    assert int(sol.stats["num_rejected_steps"]) >= 1
    assert float(jnp.max(jnp.abs(sol.ys[-1] - _linear_exact(3.0)))) < 1e-6


@pytest.mark.parametrize(
    "solver",
    [
        revdiffrax.Reversible(diffrax.Tsit5()),
        revdiffrax.Reversible(diffrax.Heun(), coupling=0.5),
        revdiffrax.ReversibleHeun(),
    ],
    ids=["Reversible(Tsit5)", "Reversible(Heun,0.5)", "ReversibleHeun"],
)
def test_dense_output_continuity(solver):
    # The local interpolant of a step starts at y0 and ends at y1 (not at z0 / z1),
    # including after a few steps, where y and z differ.
    term = diffrax.ODETerm(lambda t, y, args: -y + jnp.sin(t) * y**2 + 0.3 * y[::-1])

    @jax.jit
    def run(y0):
        ts = jnp.array([0.0, 0.2, 0.5, 0.6, 0.9])
        state = solver.init(term, ts[0], ts[-1], y0, None)
        out = []
        for i in range(len(ts) - 1):
            t0, t1 = ts[i], ts[i + 1]
            y1, _, dense, state, _ = solver.step(term, t0, t1, y0, None, state, False)
            interp = solver.interpolation_cls(t0=t0, t1=t1, **dense)
            out.append(
                (
                    y0,
                    y1,
                    interp.evaluate(t0),
                    interp.evaluate(t1),
                    interp.evaluate(t0, t1),
                )
            )
            y0 = y1
        return out

    for y0, y1, at_t0, at_t1, increment in run(jnp.array([0.5, -0.3])):
        np.testing.assert_allclose(at_t0, y0, rtol=1e-14, atol=1e-15)
        np.testing.assert_allclose(at_t1, y1, rtol=1e-14, atol=1e-15)
        np.testing.assert_allclose(increment, y1 - y0, rtol=1e-13, atol=1e-15)


#
# FSAL
#


def _nonlinear_vf(t, y, args):
    return -y + jnp.sin(t) * y**2 + 0.3 * y[::-1]


@pytest.mark.parametrize(
    "base",
    [diffrax.Tsit5(), diffrax.Dopri5(), diffrax.Bosh3()],
    ids=lambda b: type(b).__name__,
)
def test_fsal_steps_match_design_formula(base):
    # Independent implementation of the scheme of docs/mathematics.md, section "The
    # reversible scheme", where every base step starts from a fresh `base.init` (so
    # no first-same-as-last stage can be carried over between base steps that start
    # from different points).
    lam = 0.999
    term = diffrax.ODETerm(_nonlinear_vf)
    solver = revdiffrax.Reversible(base, coupling=lam)
    ts = jnp.array([0.0, 0.1, 0.25, 0.3, 0.5, 0.55])

    def psi(t0, t1, u):
        state = base.init(term, t0, t1, u, None)
        return base.step(term, t0, t1, u, None, state, False)[0] - u

    @jax.jit
    def run(y0):
        y, z = y0, y0
        state = solver.init(term, ts[0], ts[-1], y0, None)
        out, ref = [], []
        for i in range(len(ts) - 1):
            t0, t1 = ts[i], ts[i + 1]
            y_new = lam * y + (1 - lam) * z + psi(t0, t1, z)
            z = z - psi(t1, t0, y_new)
            y = y_new
            y0, _, _, state, _ = solver.step(term, t0, t1, y0, None, state, False)
            out.append((y0, state[0]))
            ref.append((y, z))
        return out, ref

    out, ref = run(jnp.array([0.5, -0.3]))
    for (y, z), (y_ref, z_ref) in zip(out, ref):
        np.testing.assert_allclose(y, y_ref, rtol=1e-14, atol=1e-15)
        np.testing.assert_allclose(z, z_ref, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize(
    "base_cls", [diffrax.Tsit5, diffrax.Dopri5], ids=lambda c: c.__name__
)
def test_fsal_user_solver_untouched(base_cls):
    term = diffrax.ODETerm(_nonlinear_vf)
    y0 = jnp.array([0.5, -0.3])

    def solve(solver):
        return diffrax.diffeqsolve(
            term,
            solver,
            0.0,
            2.0,
            0.05,
            y0,
            saveat=diffrax.SaveAt(ts=jnp.linspace(0.0, 2.0, 7)),
            stepsize_controller=diffrax.PIDController(rtol=1e-7, atol=1e-7),
        ).ys

    fresh = solve(revdiffrax.Reversible(base_cls()))

    user_base = base_cls()
    snapshot = copy.deepcopy(user_base)
    wrapped = revdiffrax.Reversible(user_base)
    wrapped_snapshot = copy.deepcopy(wrapped)
    # Use the user's object on its own first, then wrapped, twice.
    plain = solve(user_base)
    used = solve(wrapped)
    used_again = solve(wrapped)
    np.testing.assert_array_equal(used, fresh)
    np.testing.assert_array_equal(used_again, fresh)
    assert eqx.tree_equal(user_base, snapshot) is True
    assert eqx.tree_equal(wrapped, wrapped_snapshot) is True
    assert wrapped.solver is user_base
    # And the reversible result is a good solution (a stale FSAL stage would not be).
    np.testing.assert_allclose(used, plain, rtol=0, atol=1e-5)


#
# Adjoints
#


def _sie_terms():
    return (
        diffrax.ODETerm(lambda t, p, args: p),
        diffrax.ODETerm(lambda t, q, args: -args * jnp.sin(q)),
    )


ADJOINT_CASES = {
    # Adaptive steps (and an FSAL base): saves only at t1, see the vmap dense-output
    # gradient test below.
    "Reversible(Tsit5)+PID": (
        revdiffrax.Reversible(diffrax.Tsit5()),
        diffrax.ODETerm(lambda t, y, args: -args * y + jnp.sin(t) * y**2),
        diffrax.PIDController(rtol=1e-8, atol=1e-8),
        diffrax.SaveAt(t1=True),
    ),
    # Constant steps with dense output (through the reversible interpolation).
    "Reversible(Heun)": (
        revdiffrax.Reversible(diffrax.Heun(), coupling=0.9),
        diffrax.ODETerm(lambda t, y, args: -args * y + jnp.sin(t) * y**2),
        diffrax.ConstantStepSize(),
        diffrax.SaveAt(ts=jnp.array([0.3, 0.77, 1.0])),
    ),
    "ReversibleHeun": (
        revdiffrax.ReversibleHeun(),
        diffrax.ODETerm(lambda t, y, args: -args * y + jnp.sin(t) * y**2),
        diffrax.ConstantStepSize(),
        diffrax.SaveAt(ts=jnp.array([0.3, 0.77, 1.0])),
    ),
    "LeapfrogMidpoint": (
        revdiffrax.LeapfrogMidpoint(),
        diffrax.ODETerm(lambda t, y, args: -args * y + jnp.sin(t) * y**2),
        diffrax.ConstantStepSize(),
        diffrax.SaveAt(ts=jnp.array([0.3, 0.77, 1.0])),
    ),
    "SemiImplicitEuler": (
        revdiffrax.SemiImplicitEuler(),
        _sie_terms(),
        diffrax.ConstantStepSize(),
        diffrax.SaveAt(ts=jnp.array([0.3, 0.77, 1.0])),
    ),
}


def _batched_y0(name):
    y0 = jnp.array([[0.5, -0.3], [0.2, 0.4], [0.1, 0.9]])
    if name == "SemiImplicitEuler":
        return (y0, y0[:, ::-1])
    return y0


@pytest.mark.parametrize("name", list(ADJOINT_CASES))
def test_diffrax_adjoints(name):
    solver, terms, controller, saveat = ADJOINT_CASES[name]

    def loss(args, y0, adjoint):
        sol = diffrax.diffeqsolve(
            terms,
            solver,
            0.0,
            1.0,
            0.05,
            y0,
            args,
            saveat=saveat,
            stepsize_controller=controller,
            adjoint=adjoint,
            max_steps=256,
        )
        return sum(jnp.sum(leaf**2) for leaf in jtu.tree_leaves(sol.ys))

    y0s = _batched_y0(name)
    args = 1.3
    # RecursiveCheckpointAdjoint under jit(vmap(grad)), DirectAdjoint under jit(grad)
    # for each batch element (compiling both under vmap doubles the test time).
    rca = jax.jit(
        jax.vmap(
            jax.value_and_grad(
                lambda a, y: loss(a, y, RCA_ALL_STEPS),
                argnums=(0, 1),
            ),
            in_axes=(None, 0),
        )
    )
    direct = jax.jit(
        jax.value_and_grad(
            lambda a, y: loss(a, y, diffrax.DirectAdjoint()), argnums=(0, 1)
        )
    )
    v_rca, g_rca = rca(args, y0s)
    for leaf in jtu.tree_leaves((v_rca, g_rca)):
        assert np.all(np.isfinite(leaf))
    batch = len(jtu.tree_leaves(y0s)[0])
    for i in range(batch):
        y0 = jtu.tree_map(lambda x: x[i], y0s)
        v_da, g_da = direct(args, y0)
        np.testing.assert_allclose(v_rca[i], v_da, rtol=1e-12)
        g_rca_i = jtu.tree_map(lambda x: x[i], g_rca)
        for a, b in zip(jtu.tree_leaves(g_rca_i), jtu.tree_leaves(g_da)):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)

        # The gradient is the right one: central finite differences in `args`,
        # reusing the compiled function. (The adjoints treat adaptive step sizes as
        # constants, hence the looser tolerance with a PIDController.)
        eps = 1e-6
        fd = (direct(args + eps, y0)[0] - direct(args - eps, y0)[0]) / (2 * eps)
        rtol = 1e-4 if isinstance(controller, diffrax.PIDController) else 1e-6
        np.testing.assert_allclose(g_da[0], fd, rtol=rtol)


def test_dense_output_gradient_under_vmap_with_adaptive_steps():
    solver = revdiffrax.Reversible(diffrax.Heun())

    def loss(args, y0):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, args: -args * y + jnp.sin(t) * y**2),
            solver,
            0.0,
            1.0,
            0.05,
            y0,
            args,
            saveat=diffrax.SaveAt(ts=jnp.linspace(0.0, 1.0, 5)),
            stepsize_controller=diffrax.PIDController(rtol=1e-6, atol=1e-6),
        )
        return jnp.sum(sol.ys**2)

    y0 = jnp.array([[0.5, -0.3], [0.2, 0.4], [0.1, 0.9]])
    values, grads = jax.jit(jax.vmap(jax.value_and_grad(loss), in_axes=(None, 0)))(
        1.3, y0
    )
    # The forward values are fine; the gradients of all but the batch element that
    # takes the most steps are NaN.
    assert np.all(np.isfinite(values))
    assert np.all(np.isfinite(grads)), grads
