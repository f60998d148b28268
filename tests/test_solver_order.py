"""Empirical convergence orders of the revdiffrax solvers, through diffeqsolve.

Orders are fitted (least squares of log error against log step size) over a few step
sizes chosen so that errors stay far above float64 rounding and in the asymptotic
regime.

Note on the step sizes: for the McCallum-Foster scheme with the default coupling
lambda = 0.999, the error constant of odd-order bases changes when h * |f'| becomes
comparable to 1 - lambda (the scheme is exactly symmetric at lambda = 1), and for
dissipative problems with h * |Re f'| > -ln(lambda) the scheme is outside its
stability strip (see docs/mathematics.md, section "Stability"), which gives a
pre-asymptotic regime at coarse steps. The step sizes below sit between those two
regimes.
"""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import revdiffrax


T1 = 2.0
_Y0 = jnp.array([1.0, 2.0])


def _gauss_vf(t, y, args):
    return -t * y


def _gauss_exact(t):
    return _Y0 * jnp.exp(-(t**2) / 2)


def _fit_order(dts, errs):
    dts, errs = np.asarray(dts), np.asarray(errs)
    assert np.all(np.isfinite(errs))
    return np.polyfit(np.log(dts), np.log(errs), 1)[0]


def _solve_errors(solver, ns, terms=None, y0=_Y0, exact=_gauss_exact, t1=T1, ts=None):
    """Max-norm error at t1 (or at `ts`, via dense output) for each number of steps."""
    terms = diffrax.ODETerm(_gauss_vf) if terms is None else terms
    saveat = diffrax.SaveAt(t1=True) if ts is None else diffrax.SaveAt(ts=ts)

    @jax.jit
    def error(dt):
        sol = diffrax.diffeqsolve(
            terms,
            solver,
            0.0,
            t1,
            dt,
            y0,
            saveat=saveat,
            stepsize_controller=diffrax.ConstantStepSize(),
            max_steps=1024,
        )
        assert sol.ys is not None
        target = exact(t1) if ts is None else jax.vmap(exact)(ts)
        got = jax.tree_util.tree_map(lambda x: x[-1], sol.ys) if ts is None else sol.ys
        err = jax.tree_util.tree_map(lambda a, b: jnp.max(jnp.abs(a - b)), got, target)
        return jnp.max(jnp.stack(jax.tree_util.tree_leaves(err)))

    dts = [t1 / n for n in ns]
    errs = [float(error(dt)) for dt in dts]
    return dts, errs


# (base, expected order, numbers of steps over [0, 2])
REVERSIBLE_CASES = [
    (diffrax.Euler(), 1, [16, 32, 64, 128]),
    (diffrax.Midpoint(), 2, [128, 256, 512, 1024]),
    (diffrax.Heun(), 2, [64, 128, 256, 512]),
    (diffrax.Ralston(), 2, [128, 256, 512, 1024]),
    (diffrax.Bosh3(), 3, [16, 32, 64, 128]),
    (diffrax.Tsit5(), 5, [16, 32, 64, 128]),
    (diffrax.Dopri5(), 5, [8, 16, 32, 64]),
]


@pytest.mark.parametrize(
    "base,order,ns",
    REVERSIBLE_CASES,
    ids=[type(c[0]).__name__ for c in REVERSIBLE_CASES],
)
def test_reversible_order(base, order, ns):
    dts, errs = _solve_errors(revdiffrax.Reversible(base), ns)
    assert min(errs) > 1e-13  # well above rounding
    p = _fit_order(dts, errs)
    print(f"\nORDER Reversible({type(base).__name__}) {p:.3f} errs={errs}")
    assert abs(p - order) < 0.25


def test_reversible_dopri8_order():
    dts, errs = _solve_errors(revdiffrax.Reversible(diffrax.Dopri8()), [3, 4, 6, 8])
    assert min(errs) > 1e-12
    p = _fit_order(dts, errs)
    print(f"\nORDER Reversible(Dopri8) {p:.3f} errs={errs}")
    assert p >= 7


@pytest.mark.parametrize(
    "solver,order,ns",
    [
        (revdiffrax.ReversibleHeun(), 2, [64, 128, 256, 512]),
        (revdiffrax.LeapfrogMidpoint(), 2, [16, 32, 64, 128]),
    ],
    ids=["ReversibleHeun", "LeapfrogMidpoint"],
)
def test_multistep_order(solver, order, ns):
    dts, errs = _solve_errors(solver, ns)
    p = _fit_order(dts, errs)
    print(f"\nORDER {type(solver).__name__} {p:.3f} errs={errs}")
    assert abs(p - order) < 0.25


def test_semi_implicit_euler_order():
    # Harmonic oscillator q' = p, p' = -q.
    q0, p0 = jnp.array([1.0, 0.0]), jnp.array([0.0, 0.5])
    terms = (
        diffrax.ODETerm(lambda t, p, args: p),
        diffrax.ODETerm(lambda t, q, args: -q),
    )

    def exact(t):
        c, s = jnp.cos(t), jnp.sin(t)
        return (q0 * c + p0 * s, -q0 * s + p0 * c)

    dts, errs = _solve_errors(
        revdiffrax.SemiImplicitEuler(),
        [32, 64, 128, 256],
        terms,
        (q0, p0),
        exact,
        t1=3.0,
    )
    p = _fit_order(dts, errs)
    print(f"\nORDER SemiImplicitEuler {p:.3f} errs={errs}")
    assert abs(p - 1) < 0.25


def test_reversible_nonlinear_order():
    # A nonlinear problem with a closed-form solution: the logistic equation.
    y0 = jnp.array([0.1, 0.5])
    terms = diffrax.ODETerm(lambda t, y, args: y * (1 - y))

    def exact(t):
        return 1 / (1 + (1 / y0 - 1) * jnp.exp(-t))

    for base, order, ns in [
        (diffrax.Midpoint(), 2, [8, 16, 32, 64]),
        (diffrax.Bosh3(), 3, [8, 16, 32, 64]),
    ]:
        dts, errs = _solve_errors(revdiffrax.Reversible(base), ns, terms, y0, exact)
        p = _fit_order(dts, errs)
        print(f"\nORDER logistic Reversible({type(base).__name__}) {p:.3f} errs={errs}")
        assert abs(p - order) < 0.25


def test_reversible_dense_output_order():
    # Off-grid output times: for every step count below, none of them is a step end.
    ts = jnp.array([0.37, 0.91, 1.53, 1.97])
    ns = [8, 16, 32, 64]
    for n in ns:
        assert (
            np.min(np.abs(np.asarray(ts) * n / T1 - np.round(np.asarray(ts) * n / T1)))
            > 0.01
        )
    dts, errs = _solve_errors(revdiffrax.Reversible(diffrax.Tsit5()), ns, ts=ts)
    assert min(errs) > 1e-13
    p = _fit_order(dts, errs)
    print(f"\nORDER dense Reversible(Tsit5) {p:.3f} errs={errs}")
    assert p >= 4
