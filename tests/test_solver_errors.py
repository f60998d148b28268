"""Bad input to the revdiffrax solvers: each raises a ValueError naming the fix."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import revdiffrax


@pytest.mark.parametrize("coupling", [0, 0.0, -0.5, 1.5, 1.0000001])
def test_coupling_out_of_range(coupling):
    with pytest.raises(ValueError, match=r"`coupling` must lie in \(0, 1\].*0\.999"):
        revdiffrax.Reversible(diffrax.Tsit5(), coupling=coupling)


@pytest.mark.parametrize(
    "coupling",
    [np.float32(1.5), np.float32(0.0), np.int64(2), jnp.array(1.5)],
    ids=["np.float32(1.5)", "np.float32(0)", "np.int64(2)", "jnp.array(1.5)"],
)
def test_coupling_out_of_range_array_like(coupling):
    with pytest.raises(ValueError, match=r"`coupling` must lie in \(0, 1\]"):
        revdiffrax.Reversible(diffrax.Tsit5(), coupling=coupling)


@pytest.mark.parametrize("coupling", [1e-3, 0.5, 0.999, 1, 1.0])
def test_coupling_in_range(coupling):
    solver = revdiffrax.Reversible(diffrax.Tsit5(), coupling=coupling)
    assert solver.coupling == coupling


def test_default_coupling():
    assert revdiffrax.Reversible(diffrax.Tsit5()).coupling == 0.999


@pytest.mark.parametrize(
    "solver",
    [diffrax.ImplicitEuler(), diffrax.Kvaerno5(), diffrax.KenCarp3()],
    ids=lambda s: type(s).__name__,
)
def test_implicit_solver(solver):
    with pytest.raises(
        ValueError,
        match=r"needs an explicit solver.*implicit.*Reversible\(diffrax\.Tsit5\(\)\)",
    ):
        revdiffrax.Reversible(solver)


def test_ito_solver_at_construction():
    with pytest.raises(ValueError, match=r"`ItoMilstein`.*Ito.*Stratonovich solver"):
        revdiffrax.Reversible(diffrax.ItoMilstein())


def _sde_terms():
    bm = diffrax.VirtualBrownianTree(
        0.0, 1.0, tol=1e-3, shape=(2,), key=jax.random.key(0)
    )
    return diffrax.MultiTerm(
        diffrax.ODETerm(lambda t, y, args: -y),
        diffrax.ControlTerm(lambda t, y, args: jnp.eye(2), bm),
    )


def test_euler_on_sde_raises_at_diffeqsolve():
    # Euler is fine for ODEs (it is first order either way), so it is only rejected
    # once it meets SDE terms.
    solver = revdiffrax.Reversible(diffrax.Euler())
    with pytest.raises(
        ValueError, match=r"`diffrax\.Euler`.*Ito.*Reversible\(diffrax\.Heun\(\)\)"
    ):
        diffrax.diffeqsolve(_sde_terms(), solver, 0.0, 1.0, 0.1, jnp.ones(2))
    # ... but works on the ODE part alone.
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, args: -y), solver, 0.0, 1.0, 0.1, jnp.ones(2)
    )
    assert jnp.all(jnp.isfinite(sol.ys))


@pytest.mark.parametrize(
    "solver,name",
    [
        (diffrax.ReversibleHeun(), "ReversibleHeun"),
        (diffrax.LeapfrogMidpoint(), "LeapfrogMidpoint"),
        (diffrax.SemiImplicitEuler(), "SemiImplicitEuler"),
        (revdiffrax.ReversibleHeun(), "ReversibleHeun"),
        (revdiffrax.LeapfrogMidpoint(), "LeapfrogMidpoint"),
        (revdiffrax.SemiImplicitEuler(), "SemiImplicitEuler"),
        (revdiffrax.Reversible(diffrax.Tsit5()), "Reversible"),
    ],
    ids=[
        "diffrax.ReversibleHeun",
        "diffrax.LeapfrogMidpoint",
        "diffrax.SemiImplicitEuler",
        "revdiffrax.ReversibleHeun",
        "revdiffrax.LeapfrogMidpoint",
        "revdiffrax.SemiImplicitEuler",
        "Reversible(Reversible(Tsit5))",
    ],
)
def test_already_reversible(solver, name):
    if name == "Reversible":
        match = r"`Reversible` is already reversible"
    else:
        match = (
            rf"`{name}` is already reversible.*Use it directly.*revdiffrax\.{name}\(\)"
        )
    with pytest.raises(ValueError, match=match):
        revdiffrax.Reversible(solver)


@pytest.mark.parametrize("not_a_solver", [None, "Tsit5", diffrax.Tsit5])
def test_not_a_solver(not_a_solver):
    with pytest.raises(
        ValueError, match=r"expects a diffrax solver.*diffrax\.Tsit5\(\)"
    ):
        revdiffrax.Reversible(not_a_solver)


def test_langevin_solver():
    with pytest.raises(ValueError, match=r"Langevin.*Reversible\(diffrax\.ShARK\(\)\)"):
        revdiffrax.Reversible(diffrax.ALIGN(0.1))


def test_marked_stratonovich():
    # So that diffeqsolve does not warn that it converges to neither solution.
    assert isinstance(
        revdiffrax.Reversible(diffrax.Heun()), diffrax.AbstractStratonovichSolver
    )
    assert isinstance(revdiffrax.ReversibleHeun(), diffrax.AbstractStratonovichSolver)
