"""Linear stability of the two families of reversible solvers in revdiffrax.

For y' = a y and x = h a, one step of a reversible solver maps its *extended* state
linearly: (y, v) for `AsynchronousLeapfrog`, (y, yhat) for `ReversibleHeun`, the
same for their `SymmetricComposition`s, and (y, z) for the McCallum-Foster
`Reversible(base, coupling)`. The method is linearly stable at x when the spectral
radius of that one-step matrix is at most 1. The matrices are measured from the
solvers' own `step` (a complex a = u + iv is written as the real system
y' = [[u, -v], [v, u]] y, and the step is differentiated with `jax.jacfwd`), so the
plot checks the code, not a formula.

Writes `results/stability_families.png` and prints, per solver, the stable
interval on the imaginary axis (also per vector-field evaluation), the largest
stable interval on the negative real axis, and the largest stable square next to
the origin in the left half-plane (-r <= Re x <= 0, |Im x| <= r): r = 0 means that
the method is stable on the imaginary axis only.

Run: `python benchmarks/stability_families.py` (about half a minute on a laptop CPU).
"""

from __future__ import annotations

import argparse
import pathlib
from collections.abc import Callable, Sequence

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import revdiffrax

# Importing `experiments` switches on float64 (experiments/__init__.py).
from experiments.report import markdown_table


STABLE_TOL = 1e-9  # spectral radius <= 1 + STABLE_TOL counts as stable

ALF = revdiffrax.AsynchronousLeapfrog()


def _term(u: jax.Array, v: jax.Array) -> diffrax.ODETerm:
    mat = jnp.stack([jnp.stack([u, -v]), jnp.stack([v, u])])
    return diffrax.ODETerm(lambda t, y, args: mat @ y)


def _symmetric_map(solver: diffrax.AbstractSolver) -> Callable:
    """(y, aux) -> (y1, aux1) for ALF / ReversibleHeun-based solvers, h = 1."""
    base = solver
    if isinstance(solver, revdiffrax.SymmetricComposition):
        base = solver.solver

    def one_step(u, v, w):
        term = _term(u, v)
        y, aux = w[:2], w[2:]
        if isinstance(base, revdiffrax.ReversibleHeun):
            state = (aux, term.vf(0.0, aux, None))  # (yhat, f(yhat))
        else:
            state = aux  # v
        y1, _, _, state1, _ = solver.step(term, 0.0, 1.0, y, None, state, False)
        aux1 = state1[0] if isinstance(base, revdiffrax.ReversibleHeun) else state1
        return jnp.concatenate([y1, aux1])

    return one_step


def _coupled_map(solver: revdiffrax.Reversible) -> Callable:
    """(y, z) -> (y1, z1) for `Reversible(base, coupling)`, h = 1."""

    def one_step(u, v, w):
        term = _term(u, v)
        y, z = w[:2], w[2:]
        _, base_state = solver.init(term, 0.0, 1.0, y, None)
        y1, _, _, (z1, _), _ = solver.step(
            term, 0.0, 1.0, y, None, (z, base_state), False
        )
        return jnp.concatenate([y1, z1])

    return one_step


# (label, solver, vector-field evaluations per step, family)
SOLVERS = [
    ("AsynchronousLeapfrog()", ALF, 1, "symmetric"),
    (
        "AsynchronousLeapfrog(damping=0.9)",
        revdiffrax.AsynchronousLeapfrog(0.9),
        1,
        "damped",
    ),
    (
        "SymmetricComposition(ALF, 4)",
        revdiffrax.SymmetricComposition(ALF, 4),
        3,
        "symmetric",
    ),
    (
        "SymmetricComposition(ALF, 6)",
        revdiffrax.SymmetricComposition(ALF, 6),
        18,
        "symmetric",
    ),
    (
        "SymmetricComposition(ReversibleHeun, 4)",
        revdiffrax.SymmetricComposition(revdiffrax.ReversibleHeun(), 4),
        3,
        "symmetric",
    ),
    (
        "Reversible(Midpoint, 0.999)",
        revdiffrax.Reversible(diffrax.Midpoint(), 0.999),
        4,
        "coupled",
    ),
    (
        "Reversible(Midpoint, 0.9)",
        revdiffrax.Reversible(diffrax.Midpoint(), 0.9),
        4,
        "coupled",
    ),
    (
        "Reversible(Tsit5, 0.999)",
        revdiffrax.Reversible(diffrax.Tsit5(), 0.999),
        12,
        "coupled",
    ),
    (
        "Reversible(Tsit5, 0.9)",
        revdiffrax.Reversible(diffrax.Tsit5(), 0.9),
        12,
        "coupled",
    ),
]


def spectral_radius_fn(
    solver: diffrax.AbstractSolver, family: str
) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    one_step = _coupled_map(solver) if family == "coupled" else _symmetric_map(solver)

    @jax.jit
    def matrices(us, vs):
        def one(u, v):
            return jax.jacfwd(lambda w: one_step(u, v, w))(jnp.zeros(4))

        return jax.vmap(one)(us, vs)

    def radius(us, vs):
        mats = np.asarray(matrices(jnp.asarray(us), jnp.asarray(vs)))
        return np.max(np.abs(np.linalg.eigvals(mats)), axis=-1)

    return radius


def _stable_extent(radius_on_ray: np.ndarray, grid: np.ndarray) -> float:
    """Largest g in `grid` (increasing, from 0) such that all points up to g are
    stable."""
    stable = radius_on_ray <= 1 + STABLE_TOL
    if not stable[0]:
        return 0.0
    bad = np.nonzero(~stable)[0]
    return float(grid[-1] if len(bad) == 0 else grid[bad[0] - 1])


def summarise(radius: Callable) -> tuple[float, float, float]:
    """Imaginary-axis extent, negative-real extent and stable square."""
    imag_grid = np.linspace(0.0, 8.0, 8001)
    imag = _stable_extent(radius(np.zeros_like(imag_grid), imag_grid), imag_grid)
    real_grid = np.linspace(0.0, 6.0, 6001)
    real = _stable_extent(radius(-real_grid, np.zeros_like(real_grid)), real_grid)
    # Largest square -r <= Re x <= 0, |Im x| <= r that is entirely stable: how far
    # into the left half-plane a method is stable near the origin.
    side = np.concatenate(
        [np.linspace(0.0, 0.01, 101), np.linspace(0.01, 0.5, 246)[1:]]
    )
    uu, vv = np.meshgrid(-side, side, indexing="ij")
    rad = radius(uu.ravel(), vv.ravel()).reshape(uu.shape)
    # worst[k] = max radius over the square of side side[k].
    worst = np.maximum.accumulate(np.maximum.accumulate(rad, axis=0), axis=1)
    strip = _stable_extent(np.diagonal(worst), side)
    return imag, real, strip


TABLE_HEADER = (
    "solver",
    "family",
    "f-evals/step",
    "stable on imaginary axis, |Im x| <=",
    "per f-eval",
    "stable on negative real axis, -x <=",
    "stable square r (-r <= Re x <= 0, |Im x| <= r)",
)


def _plot(
    ax,
    re: np.ndarray,
    im: np.ndarray,
    rad: np.ndarray,
    title: str,
    imag: float,
    real: float,
) -> None:
    """Stable region (blue: spectral radius `rad` <= 1 on the grid `re` x `im`)
    and stable part of the imaginary axis (red) of one solver."""
    stable = (rad <= 1 + STABLE_TOL).astype(float)
    ax.contourf(re, im, stable, levels=[0.5, 1.5], colors=["tab:blue"], alpha=0.5)
    # The imaginary-axis interval, which is measure-zero in the 2-d grid.
    ax.plot([0, 0], [-imag, imag], color="tab:red", lw=2.5)
    ax.axhline(0, color="k", lw=0.5)
    ax.axvline(0, color="k", lw=0.5)
    if 0 < real < re[1] - re[0]:
        ax.text(
            -0.48,
            -3.7,
            f"stable strip |Re x| <= {real:.3f}\n(thinner than a pixel)",
            fontsize=8,
        )
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("Re(h a)")
    ax.set_ylabel("Im(h a)")
    ax.set_xlim(re[0], re[-1])
    ax.set_ylim(im[0], im[-1])


def main(argv: Sequence[str] | None = None) -> list[tuple]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/stability_families.png")
    parser.add_argument("--resolution", type=int, default=181)
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # A narrow window around the imaginary axis, where the two families differ.
    re = np.linspace(-0.5, 0.1, args.resolution)
    im = np.linspace(-4.0, 4.0, 2 * args.resolution - 1)
    uu, vv = np.meshgrid(re, im)

    ncols = 3
    nrows = -(-len(SOLVERS) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.6 * nrows))
    rows = []
    for ax, (label, solver, evals, family) in zip(axes.ravel(), SOLVERS):
        radius = spectral_radius_fn(solver, family)
        rad = radius(uu.ravel(), vv.ravel()).reshape(uu.shape)
        imag, real, strip = summarise(radius)
        rows.append((label, family, evals, imag, real, strip))
        _plot(ax, re, im, rad, f"{label}\n{evals} f-evals/step", imag, real)
    for ax in axes.ravel()[len(SOLVERS) :]:
        ax.axis("off")
    fig.suptitle(
        "Linear stability of reversible solvers (blue: spectral radius of the "
        "one-step matrix <= 1; red: stable part of the imaginary axis)",
        fontsize=10,
    )
    fig.tight_layout()
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")

    cells = [
        (label, family, evals, f"{imag:.3f}", f"{imag / evals:.3f}", f"{real:.3f}")
        + (f"{strip:.3f}",)
        for label, family, evals, imag, real, strip in rows
    ]
    print(markdown_table(TABLE_HEADER, cells))
    return rows


if __name__ == "__main__":
    main()
