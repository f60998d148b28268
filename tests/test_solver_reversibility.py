"""Algebraic reversibility of every revdiffrax solver.

Each test runs `solver.init`, then `solver.step` forward over a grid and
`solver.backward_step` back over the same grid, and checks that every intermediate
solution, solver state and `dense_info` is reconstructed to ~1e-12 (float64).
"""

import diffrax
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest
import revdiffrax
from helpers import leafwise_rel_err


T0, T1 = 0.0, 2.0
NUM_STEPS = 100
REV_TOL = 1e-12


def _uniform_ts(dtype=jnp.float64):
    return jnp.linspace(T0, T1, NUM_STEPS + 1, dtype=dtype)


def _random_ts(seed=0, dtype=jnp.float64):
    # "Adaptive-like" grid: step sizes varying by a factor of up to 9 between steps.
    rng = np.random.default_rng(seed)
    dts = rng.uniform(0.2, 1.8, NUM_STEPS)
    ts = T0 + (T1 - T0) * np.concatenate([[0.0], np.cumsum(dts)]) / np.sum(dts)
    ts[-1] = T1  # exactly, so that a VirtualBrownianTree on [T0, T1] accepts it
    assert np.all(np.diff(ts) > 0)
    return jnp.asarray(ts, dtype=dtype)


GRIDS = {"uniform": _uniform_ts, "nonuniform": _random_ts}


def _vf(t, y, args):
    # Nonlinear, non-autonomous, coupled across the leaves of a dict PyTree.
    a, b = y["a"], y["b"]
    return {
        "a": -a + jnp.sin(t) * a**2 + 0.5 * b,
        "b": -b + jnp.sin(t) * b**2 + 0.3 * a[0] * a[1],
    }


def _y0(dtype=jnp.float64):
    return {"a": jnp.array([0.5, -0.3], dtype=dtype), "b": jnp.array(0.8, dtype=dtype)}


def _roundtrip(solver, terms, y0, grids, args=None):
    """Forward with `step`, backward with `backward_step`, on each grid in `grids`.

    Returns, per grid, the forward trajectory `(y_N, y_n, state_n, dense_info_n,
    result_n)` and the reconstructed one `(y_n, state_n, dense_info_n, result_n)`,
    stacked over the step index n (dense info indexed by the step it belongs to).
    Grids of equal length share a single compilation.
    """

    def run(ts):
        state0 = solver.init(terms, ts[0], ts[-1], y0, args)

        def fwd(carry, i):
            y, s = carry
            y1, _, dense, s1, result = solver.step(
                terms, ts[i], ts[i + 1], y, args, s, False
            )
            return (y1, s1), (y, s, dense, result)

        n = ts.shape[0] - 1
        (yn, sn), (ys, ss, denses, res_f) = jax.lax.scan(
            fwd, (y0, state0), jnp.arange(n)
        )

        def bwd(carry, i):
            y, s = carry
            # The start of the previous step, for multistep solvers (t_0 at first).
            t_prev = ts[jnp.maximum(i - 1, 0)]
            y0_, dense, s0, result = solver.at_previous_time(t_prev).backward_step(
                terms, ts[i], ts[i + 1], y, args, s, False
            )
            return (y0_, s0), (y0_, s0, dense, result)

        # reverse=True: i runs from n - 1 down to 0, outputs are stored at index i.
        _, (ys_b, ss_b, denses_b, res_b) = jax.lax.scan(
            bwd, (yn, sn), jnp.arange(n), reverse=True
        )
        return (yn, ys, ss, denses, res_f), (ys_b, ss_b, denses_b, res_b)

    run = jax.jit(run)
    return [run(ts) for ts in grids]


def _check_roundtrip(solver, terms, y0, grids, tol=REV_TOL, args=None):
    """Returns the final forward solution on each grid, and the max error."""
    finals = []
    worst = 0.0
    for fwd, bwd in _roundtrip(solver, terms, y0, grids, args):
        (yn, ys, ss, denses, res_f), (ys_b, ss_b, denses_b, res_b) = fwd, bwd
        ok = diffrax.RESULTS.successful
        assert np.all(np.asarray(res_f == ok)) and np.all(np.asarray(res_b == ok))
        # The forward pass must have gone somewhere (not a trivially invertible map).
        assert leafwise_rel_err(y0, yn) > 0.1
        # ys[0] / ss[0] are y0 and the output of init, so these also cover the
        # reconstruction of the initial state.
        y_err = leafwise_rel_err(ys, ys_b)
        # States and dense info are compared relative to the scale of the solution,
        # since some of their leaves (e.g. y - z) are O(h^p) differences of O(1)
        # numbers.
        y_scale = max(float(np.max(np.abs(leaf))) for leaf in jtu.tree_leaves(ys))
        s_err = leafwise_rel_err(ss, ss_b, scale=y_scale)
        d_err = leafwise_rel_err(denses, denses_b, scale=y_scale)
        name = type(solver).__name__
        if isinstance(solver, revdiffrax.Reversible):
            name += f"({type(solver.solver).__name__}, {solver.coupling})"
        print(f"\nREV {name} y={y_err:.2e} state={s_err:.2e} dense={d_err:.2e}")
        assert y_err < tol, f"y not reconstructed: {y_err:.3g}"
        assert s_err < tol, f"solver state not reconstructed: {s_err:.3g}"
        assert d_err < tol, f"dense_info not reconstructed: {d_err:.3g}"
        finals.append(yn)
        worst = max(worst, y_err, s_err, d_err)
    return finals, worst


_reference_cache = {}


def _reference():
    # Accurate reference solution at T1, for a sanity check that the forward steps
    # actually solve the ODE.
    if "ode" not in _reference_cache:
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(_vf),
            diffrax.Dopri8(),
            T0,
            T1,
            0.01,
            _y0(),
            stepsize_controller=diffrax.PIDController(rtol=1e-12, atol=1e-12),
        )
        _reference_cache["ode"] = jtu.tree_map(lambda x: x[-1], sol.ys)
    return _reference_cache["ode"]


# Base solver, and a bound on the forward error at T1 after 100 steps (measured: Euler
# 0.14-0.17, second order ~2e-4, Bosh3 ~2e-5, Tsit5/Dopri5 ~1e-10, Dopri8 ~3e-13).
# Reversible(Euler) is much worse than plain Euler here: with coupling 0.999 and
# h * |Re f'| ~ 0.02 > -ln(0.999) the scheme is outside its stability strip.
ODE_BASES = [
    (diffrax.Euler(), 0.3),
    (diffrax.Heun(), 1e-3),
    (diffrax.Midpoint(), 1e-3),
    (diffrax.Ralston(), 1e-3),
    (diffrax.Bosh3(), 1e-4),
    (diffrax.Tsit5(), 1e-9),
    (diffrax.Dopri5(), 1e-9),
    (diffrax.Dopri8(), 1e-11),
]


@pytest.mark.parametrize(
    "base,fwd_tol", ODE_BASES, ids=[type(b).__name__ for b, _ in ODE_BASES]
)
def test_reversible_ode(base, fwd_tol):
    solver = revdiffrax.Reversible(base)
    term = diffrax.ODETerm(_vf)
    finals, _ = _check_roundtrip(solver, term, _y0(), [g() for g in GRIDS.values()])
    # The forward steps do solve the ODE.
    for yn in finals:
        assert leafwise_rel_err(_reference(), yn) < fwd_tol


@pytest.mark.parametrize("coupling", [0.5, 0.9, 1.0])
def test_reversible_ode_other_couplings(coupling):
    # Reconstruction divides by lambda each step, amplifying rounding by ~1/lambda
    # per step, so use fewer steps for small couplings (0.5**-30 ~ 1e9).
    solver = revdiffrax.Reversible(diffrax.Heun(), coupling=coupling)
    term = diffrax.ODETerm(_vf)
    n = 30 if coupling == 0.5 else 100
    ts = jnp.linspace(T0, T1, n + 1)
    tol = 1e-6 if coupling == 0.5 else (1e-10 if coupling == 0.9 else REV_TOL)
    _check_roundtrip(solver, term, _y0(), [ts], tol=tol)


def test_reversible_heun():
    grids = [g() for g in GRIDS.values()]
    _check_roundtrip(revdiffrax.ReversibleHeun(), diffrax.ODETerm(_vf), _y0(), grids)


def _constant_ts(dt0=0.07):
    # `ConstantStepSize` with a `dt0` that does not divide `T1 - T0`: a first step of
    # dt0, then the rest of the interval split uniformly (as diffrax 0.7.2 does).
    num = int(np.ceil((T1 - T0) / dt0))
    rest = T0 + dt0 + (T1 - T0 - dt0) * np.arange(num) / (num - 1)
    return jnp.asarray(np.concatenate([[T0], rest]))


def test_leapfrog_midpoint_any_grid():
    # backward_step takes t_{n-1} from `at_previous_time`, so any grid reverses.
    grids = [g() for g in GRIDS.values()] + [_random_ts(seed=1), _constant_ts()]
    _check_roundtrip(revdiffrax.LeapfrogMidpoint(), diffrax.ODETerm(_vf), _y0(), grids)


def test_leapfrog_midpoint_needs_previous_time():
    solver = revdiffrax.LeapfrogMidpoint()
    term = diffrax.ODETerm(_vf)
    state = solver.init(term, T0, T1, _y0(), None)
    y1, _, _, state1, _ = solver.step(term, T0, 0.1, _y0(), None, state, False)
    with pytest.raises(ValueError, match=r"at_previous_time\(t_prev\)"):
        solver.backward_step(term, 0.1, 0.3, y1, None, state1, False)


def _sie_terms():
    # Pendulum with a time-dependent forcing, state (q, p), each a 2-vector.
    return (
        diffrax.ODETerm(lambda t, p, args: p),
        diffrax.ODETerm(lambda t, q, args: -jnp.sin(q) + 0.2 * jnp.cos(t)),
    )


def test_semi_implicit_euler():
    y0 = (jnp.array([0.3, -1.2]), jnp.array([1.0, 0.5]))
    grids = [g() for g in GRIDS.values()]
    _check_roundtrip(revdiffrax.SemiImplicitEuler(), _sie_terms(), y0, grids)


SDE_BASES = [
    diffrax.Heun(),
    diffrax.Midpoint(),
    diffrax.SlowRK(),
    diffrax.ShARK(),
    diffrax.SPaRK(),
]


@pytest.mark.parametrize("base", SDE_BASES, ids=lambda b: type(b).__name__)
def test_reversible_sde(base):
    # Algebraic reversibility holds whatever the convergence properties: the
    # VirtualBrownianTree is re-evaluated identically on the backward pass.
    bm = diffrax.VirtualBrownianTree(
        T0,
        T1,
        tol=1e-3,
        shape=(2,),
        # A cheaper-to-compile PRNG than the default threefry (VirtualBrownianTree
        # evaluations dominate the compile time of these tests).
        key=jax.random.key(0, impl="unsafe_rbg"),
        # The Levy area each solver needs (richer ones only add compile time).
        levy_area=(
            diffrax.BrownianIncrement
            if isinstance(base, (diffrax.Heun, diffrax.Midpoint))
            else diffrax.SpaceTimeLevyArea
        ),
    )
    if isinstance(base, diffrax.ShARK):
        # ShARK requires additive noise.
        diffusion = lambda t, y, args: 0.3 * jnp.array([[1.0, 0.2], [-0.1, 1.0]])
    else:
        diffusion = lambda t, y, args: (
            0.3 * jnp.diag(jnp.cos(y)) + 0.1 * jnp.outer(y, jnp.ones(2))
        )
    terms = diffrax.MultiTerm(
        diffrax.ODETerm(lambda t, y, args: -y + jnp.sin(t) * y**2),
        diffrax.ControlTerm(diffusion, bm),
    )
    y0 = jnp.array([0.5, -0.3])
    solver = revdiffrax.Reversible(base)
    _check_roundtrip(solver, terms, y0, [g() for g in GRIDS.values()])


def test_reversible_heun_sde():
    bm = diffrax.VirtualBrownianTree(
        T0, T1, tol=1e-3, shape=(2,), key=jax.random.key(1)
    )
    terms = diffrax.MultiTerm(
        diffrax.ODETerm(lambda t, y, args: -y + jnp.sin(t) * y**2),
        diffrax.ControlTerm(lambda t, y, args: 0.3 * jnp.diag(jnp.cos(y)), bm),
    )
    grids = [g() for g in GRIDS.values()]
    _check_roundtrip(revdiffrax.ReversibleHeun(), terms, jnp.array([0.5, -0.3]), grids)


@pytest.mark.parametrize(
    "solver",
    [revdiffrax.Reversible(diffrax.Heun()), revdiffrax.Reversible(diffrax.Tsit5())],
    ids=["Reversible(Heun)", "Reversible(Tsit5)"],
)
def test_reversible_cde(solver):
    tc = jnp.linspace(T0, T1, 11)
    control = diffrax.LinearInterpolation(tc, jnp.stack([tc, jnp.sin(3 * tc)], axis=-1))

    def vf(t, y, args):
        return jnp.array(
            [
                [jnp.tanh(y[1]), 0.5 * jnp.cos(y[0])],
                [-jnp.sin(y[0] * y[1]), 0.3 * jnp.sin(y[1])],
            ]
        )

    term = diffrax.ControlTerm(vf, control)
    y0 = jnp.array([0.5, -0.3])
    _check_roundtrip(solver, term, y0, [g() for g in GRIDS.values()])


@pytest.mark.parametrize(
    "solver",
    [
        revdiffrax.Reversible(diffrax.Euler()),
        revdiffrax.Reversible(diffrax.Heun()),
        revdiffrax.Reversible(diffrax.Tsit5()),
        revdiffrax.ReversibleHeun(),
        revdiffrax.LeapfrogMidpoint(),
    ],
    ids=[
        "Reversible(Euler)",
        "Reversible(Heun)",
        "Reversible(Tsit5)",
        "ReversibleHeun",
        "LeapfrogMidpoint",
    ],
)
def test_float32(solver):
    # float32 in, float32 out (also with x64 enabled), and reversible to ~1e-5 over
    # 100 steps.
    y0 = _y0(jnp.float32)
    ts = _uniform_ts(jnp.float32)
    [((yn, ys, ss, _, _), (ys_b, ss_b, _, _))] = _roundtrip(
        solver, diffrax.ODETerm(_vf), y0, [ts]
    )
    for leaf in jtu.tree_leaves((yn, ys, ss, ys_b, ss_b)):
        if jnp.issubdtype(leaf.dtype, jnp.inexact):
            assert leaf.dtype == jnp.float32
    err = leafwise_rel_err((ys, ss), (ys_b, ss_b))
    print(f"\nREV32 {solver} {err:.2e}")
    assert err < 1e-5


def test_float32_semi_implicit_euler():
    y0 = (jnp.array([0.3, -1.2], jnp.float32), jnp.array([1.0, 0.5], jnp.float32))
    [((yn, ys, _, _, _), (ys_b, _, _, _))] = _roundtrip(
        revdiffrax.SemiImplicitEuler(),
        _sie_terms(),
        y0,
        [_random_ts(dtype=jnp.float32)],
    )
    assert all(leaf.dtype == jnp.float32 for leaf in jtu.tree_leaves((yn, ys_b)))
    assert leafwise_rel_err(ys, ys_b) < 1e-5


@pytest.mark.parametrize(
    "solver",
    [
        revdiffrax.Reversible(diffrax.Euler()),
        revdiffrax.Reversible(diffrax.Tsit5()),
    ],
    ids=["Reversible(Euler)", "Reversible(Tsit5)"],
)
def test_float32_diffeqsolve(solver):
    # Same through diffeqsolve, whose while loop requires dtype-stable steps.
    y0 = jnp.array([0.5, -0.3], jnp.float32)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, args: -y + jnp.sin(t) * y**2),
        solver,
        jnp.float32(0.0),
        jnp.float32(1.0),
        jnp.float32(0.01),
        y0,
    )
    assert sol.ys.dtype == jnp.float32
    assert jnp.all(jnp.isfinite(sol.ys))
