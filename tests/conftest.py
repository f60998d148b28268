"""Test configuration: the whole suite runs with float64 enabled.

This is the only place the tests switch on `jax_enable_x64` (pytest imports this file
before any test module). The solver tests check reversibility to ~1e-12 and
convergence orders down to ~1e-12 errors, and gradients are compared to
`helpers.GRAD_RTOL` = 1e-9, all of which need double precision. Tests of float32
behaviour pass float32 inputs explicitly.
"""

import jax


jax.config.update("jax_enable_x64", True)
