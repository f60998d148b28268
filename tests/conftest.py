"""Test configuration: the whole suite runs with float64 enabled.

This is the only place the tests switch on `jax_enable_x64` (pytest imports this file
before any test module). The solver tests check reversibility to ~1e-12 and
convergence orders down to ~1e-12 errors, and gradients are compared to
`helpers.GRAD_RTOL` = 1e-9, all of which need double precision. Tests of float32
behaviour pass float32 inputs explicitly.
"""

import gc
import os

import jax
import pytest


jax.config.update("jax_enable_x64", True)


# Bounds on what one pytest(-xdist) process may keep compiled between the tests of a
# module (see `pytest_runtest_teardown`). The kernel's limit is 65530 mappings; one
# test has been seen to add a few thousand.
MAX_MAPPINGS = 20_000
MAX_RESIDENT_BYTES = 3 * 2**30
# Modules whose tests check warnings issued once per compilation (the drift and
# parasitic-mode checks): a solve compiled by an earlier test would not warn again.
CLEAR_AFTER_EACH_TEST = {"test_drift_default.py", "test_parasitic.py"}


def _mappings_and_resident_bytes():
    """This process's number of memory mappings and resident bytes, or None where
    /proc is unavailable (not Linux)."""
    try:
        with open("/proc/self/maps", "rb") as f:
            mappings = f.read().count(b"\n")
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return mappings, resident_pages * os.sysconf("SC_PAGE_SIZE")


def _must_clear(item, nextitem):
    if nextitem is None or nextitem.path != item.path:
        return True
    if item.path.name in CLEAR_AFTER_EACH_TEST:
        return True
    usage = _mappings_and_resident_bytes()
    return usage is None or usage[0] > MAX_MAPPINGS or usage[1] > MAX_RESIDENT_BYTES


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    """Drop JAX's compilation caches after the last test of each module, and after
    any test once they have grown large.

    A pytest-xdist worker runs about 180 tests and JAX's caches keep every compiled
    executable alive; on the CPU each one holds memory mappings of LLVM JIT code. A
    worker reached the kernel's limit of 65530 mappings (`vm.max_map_count`) near the
    end of the suite: "LLVM compilation error: Cannot allocate memory", then a
    crashed worker (`test_adjoint.py` alone grew one worker to 52,929 mappings).
    Clearing after every test bounded that (3,872 at most over the full suite) but
    threw away what the tests of a module share (executables of the same solves and
    of the small eager operations nearly every test runs, compiled again in each
    test) and cost a `gc.collect()` per test. So the caches are cleared at the end of
    each module, after any test once this process holds more than `MAX_MAPPINGS`
    mappings or `MAX_RESIDENT_BYTES` of memory (or where that cannot be measured),
    and after every test of the modules in `CLEAR_AFTER_EACH_TEST`.
    """
    if _must_clear(item, nextitem):
        jax.clear_caches()
        gc.collect()
