"""Reproductions of the neural-ODE experiments of McCallum & Foster (arXiv 2410.11648).

Entry points (each has a ``main(argv)`` function and a ``--quick`` mode):

- ``python -m experiments.white_dwarf``: Chandrasekhar white dwarf equation.
- ``python -m experiments.coupled_oscillators``: two coupled linear oscillators.
- ``python -m experiments.double_pendulum``: chaotic double pendulum.
- ``python -m experiments.kepler``: a Hamiltonian neural ODE on Kepler orbits.
- ``python -m experiments.neural_cde`` / ``python -m experiments.neural_sde``.
- ``python -m experiments.run_grid``: the published reversible-vs-checkpointing grid,
  written to ``results/<experiment>.md``.

The shared machinery is split by concern: `solvers` (base solvers, adjoints),
`model` (the MLP vector field), `problem` (data, solve and prediction), `harness`
(compilation, memory, timing, relative errors; also used by ``benchmarks/``),
`train` (one training run), `report` (tables, plots, machine information) and `cli`
(the command line shared by the three paper experiments).

Everything runs in float64: importing this package enables ``jax_enable_x64``, before
any of its modules (or a benchmark importing them) creates an array. This is the only
place where the experiments and benchmarks switch it on.
"""

import jax


jax.config.update("jax_enable_x64", True)
