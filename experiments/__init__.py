"""Reproductions of the neural-ODE experiments of McCallum & Foster (arXiv 2410.11648).

Entry points (each has a ``main(argv)`` function and a ``--quick`` mode):

- ``python -m experiments.white_dwarf``: Chandrasekhar white dwarf equation.
- ``python -m experiments.coupled_oscillators``: two coupled linear oscillators.
- ``python -m experiments.double_pendulum``: chaotic double pendulum.
- ``python -m experiments.run_grid``: the published reversible-vs-checkpointing grid,
  written to ``results/<experiment>.md``.

Everything runs in float64: importing this package enables ``jax_enable_x64``.
"""

import jax


jax.config.update("jax_enable_x64", True)
