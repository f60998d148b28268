"""Linear stability of `revdiffrax.Reversible`, against docs/mathematics.md,
section "Stability".

For y' = a y and x = h a, one step maps (y, z) linearly. We measure that map by
stepping the unit vectors and compare it to

    M(x) = [[lam,            1 - lam + R(x)                ],
            [-lam * R(-x),   1 - R(-x) * (1 - lam + R(x))  ]],   R = S - 1,

with S the base stability function. Complex a = u + iv is represented by the real
2x2 system y' = [[u, -v], [v, u]] y, so the measured 4x4 real map must be the
realification of the complex 2x2 M(x).
"""

import functools
import math

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import revdiffrax


def _exp_poly(order):
    return lambda x: sum(x**j / math.factorial(j) for j in range(order + 1))


def _rotation_term(u, v):
    A = jnp.stack([jnp.stack([u, -v]), jnp.stack([v, u])])
    return diffrax.ODETerm(lambda t, y, args: A @ y)


def _to_complex(block):
    # [[p, -q], [q, p]] -> p + iq, checking that it is of that form.
    np.testing.assert_allclose(block[0, 0], block[1, 1], rtol=0, atol=1e-12)
    np.testing.assert_allclose(block[0, 1], -block[1, 0], rtol=0, atol=1e-12)
    return complex(block[0, 0], block[1, 0])


@functools.cache
def _compiled(base):
    """One compilation per base solver, for all x and couplings."""

    def matrix(u, v, lam):
        # The real 4x4 one-step map of Reversible(base, lam) on (y, z), h = 1.
        solver = revdiffrax.Reversible(base, coupling=lam)
        term = _rotation_term(u, v)

        def step(w):
            y, z = w[:2], w[2:]
            _, base_state = solver.init(term, 0.0, 1.0, y, None)
            y1, _, _, (z1, _), result = solver.step(
                term, 0.0, 1.0, y, None, (z, base_state), False
            )
            return jnp.concatenate([y1, z1]), result

        return jax.vmap(step, out_axes=(1, 0))(jnp.eye(4))

    def stability_function(u, v):
        # One base step from y0 = 1 (as (1, 0)): S(x) = y1.
        term = _rotation_term(u, v)
        y0 = jnp.array([1.0, 0.0])
        state = base.init(term, 0.0, 1.0, y0, None)
        return base.step(term, 0.0, 1.0, y0, None, state, True)[0]

    return jax.jit(matrix), jax.jit(stability_function)


def _measured_M(base, lam, x):
    """The complex 2x2 one-step matrix of Reversible(base, lam) for h = 1, a = x."""
    x = complex(x)
    cols, results = _compiled(base)[0](
        jnp.asarray(x.real), jnp.asarray(x.imag), jnp.asarray(float(lam))
    )
    assert np.all(np.asarray(results == diffrax.RESULTS.successful))
    M4 = np.asarray(cols)
    return np.array(
        [
            [_to_complex(M4[2 * i : 2 * i + 2, 2 * j : 2 * j + 2]) for j in range(2)]
            for i in range(2)
        ]
    )


def _measured_S(base, x):
    """The stability function of the base solver at x, from one base step."""
    x = complex(x)
    y1 = _compiled(base)[1](jnp.asarray(x.real), jnp.asarray(x.imag))
    return complex(y1[0], y1[1])


def _design_M(S, x, lam):
    R = lambda u: S(u) - 1
    return np.array(
        [
            [lam, 1 - lam + R(x)],
            [-lam * R(-x), 1 - R(-x) * (1 - lam + R(x))],
        ]
    )


BASES = {
    "Euler": (diffrax.Euler(), _exp_poly(1)),
    "Midpoint": (diffrax.Midpoint(), _exp_poly(2)),
    "Ralston": (diffrax.Ralston(), _exp_poly(2)),
    "Bosh3": (diffrax.Bosh3(), _exp_poly(3)),
    # Tsit5 has no short closed form: its S is measured from one base step.
    "Tsit5": (diffrax.Tsit5(), None),
    "Dopri5": (diffrax.Dopri5(), lambda x: _exp_poly(5)(x) + x**6 / 600),
}
XS = [-0.7, -0.1, 0.3, 0.8j, -0.2 + 1.5j, 0.05 - 0.5j, -1.5 - 0.4j]
COUPLINGS = [0.5, 0.9, 0.999]


@pytest.mark.parametrize("name", list(BASES))
def test_one_step_matrix(name):
    base, S_closed = BASES[name]
    S = S_closed if S_closed is not None else (lambda x: _measured_S(base, x))
    for x in XS:
        x = complex(x)
        if S_closed is not None:
            # The closed-form stability polynomial is the base solver's.
            assert abs(_measured_S(base, x) - S_closed(x)) < 1e-13 * max(1, abs(S(x)))
        for lam in COUPLINGS:
            M = _measured_M(base, lam, x)
            F = _design_M(S, x, lam)
            np.testing.assert_allclose(
                M, F, rtol=0, atol=1e-12 * max(1, np.max(np.abs(F)))
            )
            # det M = lam, and the eigenvalues solve mu^2 - tr mu + lam = 0 with
            # tr = S(x) + lam S(-x) + (1 - S(x) S(-x)).
            assert abs(np.linalg.det(M) - lam) < 1e-12 * max(1, np.max(np.abs(F)) ** 2)
            tr = S(x) + lam * S(-x) + 1 - S(x) * S(-x)
            assert abs(np.trace(M) - tr) < 1e-12 * max(1, abs(tr))
            eigs = np.sort_complex(np.linalg.eigvals(M))
            roots = np.sort_complex(np.roots([1, -tr, lam]))
            np.testing.assert_allclose(eigs, roots, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["Euler", "Bosh3", "Tsit5"])
def test_eigenvalues_near_S_x_and_lam_S_minus_x(name):
    # For small x the eigenvalues are S(x) + O(x^{p+1}) (the physical mode) and
    # lam S(-x) + O(x^{p+1}) (the parasitic mode), when these are well separated.
    base, _ = BASES[name]
    lam = 0.5
    for x in [0.05, -0.05, 0.05j, -0.02 + 0.04j]:
        M = _measured_M(base, lam, x)
        S = lambda u: _measured_S(base, u)
        eigs = np.linalg.eigvals(M)
        for target in [S(x), lam * S(-x)]:
            assert np.min(np.abs(eigs - target)) < 10 * abs(x) ** 2


@pytest.mark.parametrize("name", ["Euler", "Midpoint", "Tsit5"])
def test_stability_strip(name):
    # The parasitic eigenvalue ~ lam * S(-x) has modulus ~ lam * exp(-Re x): for
    # Re x < ln(lam) < 0 the scheme is unstable even where the base method is
    # stable. Smaller couplings widen the strip.
    base, _ = BASES[name]

    def rho(lam, x):
        return np.max(np.abs(np.linalg.eigvals(_measured_M(base, lam, x))))

    for x in [-0.1, -0.1 + 0.5j]:
        if abs(_measured_S(base, x)) < 1:  # inside the base region
            assert rho(0.999, x) > 1.05  # but outside |Re x| < -ln(0.999) = 0.001
            assert rho(0.5, x) < 1  # and inside |Re x| < -ln(0.5) = 0.69


@pytest.mark.parametrize("name", ["Euler", "Midpoint", "Bosh3", "Tsit5"])
def test_coupling_one_on_imaginary_axis(name):
    # With lam = 1 and x = iy, det M = 1 and tr M = 2 - |R(iy)|^2 is real (S has
    # real coefficients), so both eigenvalues lie on the unit circle exactly when
    # |R(iy)| <= 2 -- even where the base method itself is unstable (Euler,
    # Midpoint) -- and one of them is outside it when |R(iy)| > 2.
    base, _ = BASES[name]
    for y in [0.1, 0.5, 1.0, 3.0]:
        R = _measured_S(base, 1j * y) - 1
        moduli = np.abs(np.linalg.eigvals(_measured_M(base, 1.0, 1j * y)))
        if abs(R) < 1.99:
            np.testing.assert_allclose(moduli, 1, rtol=0, atol=1e-10)
        elif abs(R) > 2.01:
            assert np.max(moduli) > 1.1
