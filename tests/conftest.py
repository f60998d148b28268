"""Test configuration: the whole suite runs with float64 enabled.

This is the only place the tests switch on `jax_enable_x64` (pytest imports this file
before any test module). The solver tests check reversibility to ~1e-12 and
convergence orders down to ~1e-12 errors, and gradients are compared to
`helpers.GRAD_RTOL` = 1e-9, all of which need double precision. Tests of float32
behaviour pass float32 inputs explicitly.
"""

import gc

import jax
import pytest


jax.config.update("jax_enable_x64", True)


@pytest.fixture(autouse=True)
def _release_compiled_code():
    """Drop JAX's compilation caches after each test.

    A pytest-xdist worker runs about 180 tests and JAX's caches keep every compiled
    executable alive; on the CPU each one holds memory mappings of LLVM JIT code. A
    worker reached the kernel's limit of 65530 mappings (`vm.max_map_count`) near the
    end of the suite: "LLVM compilation error: Cannot allocate memory", then a
    crashed worker. Clearing after each module was not enough: `test_adjoint.py`
    alone grew one worker to 52,929 mappings; with this fixture the most any worker
    held over the full suite was 3,872. Tests seldom share compiled functions,
    so clearing after each one costs little.
    """
    yield
    jax.clear_caches()
    gc.collect()
