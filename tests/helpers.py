"""Shared helpers of the test suite: errors between PyTrees, the float64 gradient
tolerance, and the solvers that several test files run through.

pytest puts this directory on `sys.path` (the tests are not a package), so test files
import these with `from helpers import ...`, under plain pytest and pytest-xdist.
"""

import functools

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import revdiffrax
from jaxtyping import PyTree


# Gradients of two exact adjoints through the same solver agree to this relative
# error (`tree_rel_err`) in float64: both are the gradient of the same discrete
# computation, so they differ by rounding only.
GRAD_RTOL = 1e-9


def tree_max_abs_diff(a: PyTree, b: PyTree) -> jax.Array:
    """max|a - b| over all leaves (`a` and `b` have the same structure); traceable."""
    leaves = zip(jtu.tree_leaves(a), jtu.tree_leaves(b), strict=True)
    return functools.reduce(jnp.maximum, [jnp.max(jnp.abs(x - y)) for x, y in leaves])


def tree_rel_err(a: PyTree, ref: PyTree) -> float:
    """max|a - ref| / max|ref| over the floating-point array leaves of `a` and `ref`
    (other leaves, e.g. the static parts of an `eqx.Module`, are ignored)."""
    la = jtu.tree_leaves(eqx.filter(a, eqx.is_inexact_array))
    lr = jtu.tree_leaves(eqx.filter(ref, eqx.is_inexact_array))
    assert len(la) == len(lr) > 0, (len(la), len(lr))
    num = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(la, lr))
    return num / max(float(jnp.max(jnp.abs(y))) for y in lr)


def leafwise_rel_err(x: PyTree, y: PyTree, scale: float = 0.0) -> float:
    """max over leaves of max|x - y| / max(max|x|, scale), checking on the way that
    structures, shapes and dtypes match, that every value is finite and that
    non-float leaves (and all-zero float leaves) are equal."""
    assert jtu.tree_structure(x) == jtu.tree_structure(y)
    err = 0.0
    for u, v in zip(jtu.tree_leaves(x), jtu.tree_leaves(y)):
        u, v = np.asarray(u), np.asarray(v)
        assert u.shape == v.shape and u.dtype == v.dtype, (u.shape, v.shape, u.dtype)
        if not np.issubdtype(u.dtype, np.inexact):
            assert np.array_equal(u, v)
            continue
        assert np.all(np.isfinite(u)) and np.all(np.isfinite(v))
        denom = max(float(np.max(np.abs(u), initial=0.0)), scale)
        if denom == 0.0:
            assert np.array_equal(u, v)
            continue
        err = max(err, float(np.max(np.abs(u - v), initial=0.0)) / denom)
    return err


# The explicit Runge--Kutta bases that `revdiffrax.Reversible` is tested with.
ERK_BASES: dict[str, diffrax.AbstractSolver] = {
    "Euler": diffrax.Euler(),
    "Midpoint": diffrax.Midpoint(),
    "Heun": diffrax.Heun(),
    "Ralston": diffrax.Ralston(),
    "Bosh3": diffrax.Bosh3(),
    "Tsit5": diffrax.Tsit5(),
    "Dopri5": diffrax.Dopri5(),
    "Dopri8": diffrax.Dopri8(),
}

# `Reversible(base)` with the default coupling, for every base above.
REVERSIBLE_SOLVERS: dict[str, revdiffrax.Reversible] = {
    f"Reversible({name})": revdiffrax.Reversible(base)
    for name, base in ERK_BASES.items()
}

# The reversible multistep solvers (no error estimate: fixed steps only).
MULTISTEP_SOLVERS: dict[str, diffrax.AbstractSolver] = {
    "ReversibleHeun": revdiffrax.ReversibleHeun(),
    "LeapfrogMidpoint": revdiffrax.LeapfrogMidpoint(),
}


# The reference adjoint of the gradient tests: diffrax's `RecursiveCheckpointAdjoint`
# with a checkpoint at every step. diffrax clips `checkpoints` to `max_steps` (which
# must then be finite, as every test sets it), and with `checkpoints == max_steps` its
# loop stores every step instead of running the online treeverse schedule: the same
# discrete gradient as the default's, from a program that compiles about 30% faster
# (compilation is most of this suite's time). Tests of `RecursiveCheckpointAdjoint()`
# itself (its memory, its refusals, users' defaults) keep the default.
RCA_ALL_STEPS = diffrax.RecursiveCheckpointAdjoint(checkpoints=2**31 - 1)
