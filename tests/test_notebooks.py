"""Execute every notebook in `notebooks/` top to bottom, so that none of them rots.

Each notebook runs in a fresh Jupyter kernel started from this interpreter (so it
sees the installed revdiffrax), with the notebooks directory as working directory and
matplotlib's non-interactive Agg backend. A failing cell fails the test with that
cell's source and traceback. The notebooks check their own claims with `assert`s.
"""

import json
import pathlib
import re
import sys
import time

import ipykernel  # noqa: F401  (the kernel; imported so that a missing one fails here)
import nbclient
import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager


NOTEBOOKS_DIR = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
KERNEL_NAME = "revdiffrax-notebook-test"
# Per cell; the notebooks are meant to take well under a minute in total on a CPU.
CELL_TIMEOUT_S = 600


def make_kernel_spec_manager(directory, mpl_backend="Agg"):
    """A kernelspec in `directory` that runs this interpreter with the given matplotlib
    backend (Agg: figures are drawn but not displayed), and a manager that finds only
    it."""
    spec_dir = pathlib.Path(directory) / KERNEL_NAME
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": [
            sys.executable,
            "-Xfrozen_modules=off",
            "-m",
            "ipykernel_launcher",
            "-f",
            "{connection_file}",
        ],
        "display_name": "revdiffrax notebook test",
        "language": "python",
        "env": {"MPLBACKEND": mpl_backend, "PYDEVD_DISABLE_FILE_VALIDATION": "1"},
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return KernelSpecManager(kernel_dirs=[str(directory)])


@pytest.fixture(scope="module")
def kernel_spec_manager(tmp_path_factory):
    return make_kernel_spec_manager(tmp_path_factory.mktemp("kernels"))


def execute_notebook(path, kernel_spec_manager, nb=None, **kwargs):
    """Run the notebook at `path` (or `nb`, from `path`'s directory) in a fresh
    kernel; returns the executed notebook."""
    if nb is None:
        nb = nbformat.read(path, as_version=4)
    km = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=kernel_spec_manager)
    client = nbclient.NotebookClient(
        nb,
        km=km,
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(path.parent)}},
        **kwargs,
    )
    try:
        client.execute()
    finally:
        # nbclient only shuts down kernels it created itself; without this, every
        # notebook would leave an idle kernel (~700 MB) behind until pytest exits.
        if km.has_kernel:
            km.shutdown_kernel(now=True)
    return nb


def test_notebooks_found():
    assert len(NOTEBOOKS) >= 5, NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes(path, kernel_spec_manager):
    start = time.perf_counter()
    try:
        execute_notebook(path, kernel_spec_manager)
    except nbclient.exceptions.CellExecutionError as e:
        # The message holds the failing cell's source and its traceback.
        message = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # drop ANSI colours
        pytest.fail(f"{path.name} failed:\n{message}", pytrace=False)
    print(f"{path.name}: executed in {time.perf_counter() - start:.1f} s")
