"""Loaders and writers for the motion-capture text files of the physical-system
experiments (Schmidt & Lipson, Science 2009, as used by McCallum & Foster).

File format (both files):

- first line: a header starting with ``%`` naming the four state columns,
  e.g. ``% x1 x2 v1 v2`` (coupled oscillators) or ``% o1 o2 w1 w2`` (pendulum);
- then one row per sample, whitespace separated: ``trial t <state...> [extra...]``.

The data files are never part of this repository: pass a path (``--data PATH``), or
let the experiments simulate the same physical system and write it in this format.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class MotionCaptureFormat:
    """Description of one motion-capture file format and the published preprocessing."""

    name: str
    header: tuple[str, ...]  # the names after `%` on the first line
    columns: tuple[str, ...]  # the meaning of every column of a data row
    state_columns: tuple[int, ...]  # indices (0-based) of the state in a row
    scale: float  # the state is divided by this
    t_max: float  # keep [0, t_max] seconds (time is shifted to start at 0)
    n_points: int  # linearly interpolated onto this many evenly spaced times
    trial: int = 0

    def describe(self) -> str:
        return (
            f"a whitespace-separated text file whose first line is the header "
            f"'% {' '.join(self.header)}' followed by rows of {len(self.columns)} "
            f"numbers: {' '.join(self.columns)}"
        )


OSCILLATOR_FORMAT = MotionCaptureFormat(
    name="coupled oscillators (real_double_linear_h_1.txt)",
    header=("x1", "x2", "v1", "v2"),
    columns=("trial", "t", "x1", "x2", "v1", "v2"),
    state_columns=(2, 3, 4, 5),
    scale=100.0,
    t_max=3.0,
    n_points=500,
)

PENDULUM_FORMAT = MotionCaptureFormat(
    name="double pendulum (real_double_pend_h_1.txt)",
    header=("o1", "o2", "w1", "w2"),
    columns=(
        "trial",
        "t",
        "theta1",
        "theta2",
        "omega1",
        "omega2",
        "omega1",
        "omega2",
        "a1",
        "a2",
    ),
    state_columns=(2, 3, 4, 5),
    scale=10.0,
    t_max=2.0,
    n_points=500,
)


def read_motion_capture(
    path: str | os.PathLike, fmt: MotionCaptureFormat
) -> np.ndarray:
    """Read and validate a motion-capture file; returns all rows, shape (rows, cols).

    Raises `FileNotFoundError` if the file is missing and `ValueError` if it does not
    have the expected format. Both messages describe the expected format.
    """
    path = os.fspath(path)
    expected = f"Expected {fmt.name} data: {fmt.describe()}."
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Data file not found: {path!r}. {expected}")
    with open(path) as f:
        lines = f.read().splitlines()
    if not lines:
        raise ValueError(f"Data file {path!r} is empty. {expected}")
    header = lines[0].strip()
    if not header.startswith("%"):
        raise ValueError(
            f"Data file {path!r}: the first line should be the header "
            f"'% {' '.join(fmt.header)}', got {header[:80]!r}. {expected}"
        )
    names = tuple(header[1:].split())
    if names != fmt.header:
        raise ValueError(
            f"Data file {path!r}: header names {' '.join(names)!r} do not match the "
            f"expected '{' '.join(fmt.header)}'. {expected}"
        )
    rows = []
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != len(fmt.columns):
            raise ValueError(
                f"Data file {path!r}, line {lineno}: expected {len(fmt.columns)} "
                f"columns, got {len(fields)}. {expected}"
            )
        try:
            rows.append([float(x) for x in fields])
        except ValueError:
            raise ValueError(
                f"Data file {path!r}, line {lineno}: could not parse numbers from "
                f"{line.strip()[:80]!r}. {expected}"
            ) from None
    if len(rows) < 2:
        raise ValueError(
            f"Data file {path!r} has {len(rows)} data rows; need at least 2. {expected}"
        )
    data = np.asarray(rows, dtype=np.float64)
    if not np.all(np.isfinite(data)):
        raise ValueError(f"Data file {path!r} contains non-finite values. {expected}")
    return data


def load_motion_capture(
    path: str | os.PathLike,
    fmt: MotionCaptureFormat,
    *,
    t_max: float | None = None,
    n_points: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Load a file with the published preprocessing.

    Selects `fmt.trial`, shifts time to start at 0, keeps [0, t_max], divides the
    state by `fmt.scale` and interpolates linearly onto `n_points` evenly spaced
    times. Returns `(ts, ys)` with shapes `(n_points,)` and `(n_points, 4)`.
    """
    t_max = fmt.t_max if t_max is None else t_max
    n_points = fmt.n_points if n_points is None else n_points
    data = read_motion_capture(path, fmt)
    expected = f"Expected {fmt.name} data: {fmt.describe()}."
    trial = data[data[:, 0] == fmt.trial]
    if len(trial) < 2:
        trials = sorted(set(data[:, 0].tolist()))
        raise ValueError(
            f"Data file {os.fspath(path)!r} has no (or only one) row for trial "
            f"{fmt.trial}; trials present: {trials}. {expected}"
        )
    t = trial[:, 1]
    if not np.all(np.diff(t) > 0):
        raise ValueError(
            f"Data file {os.fspath(path)!r}: times (column 2) of trial {fmt.trial} are "
            f"not strictly increasing. {expected}"
        )
    t = t - t[0]
    if t[-1] < t_max - 1e-9:
        raise ValueError(
            f"Data file {os.fspath(path)!r}: trial {fmt.trial} covers only "
            f"{t[-1]:.3f} s, but {t_max} s are needed. {expected}"
        )
    state = trial[:, list(fmt.state_columns)] / fmt.scale
    ts = np.linspace(0.0, t_max, n_points)
    ys = np.stack([np.interp(ts, t, state[:, i]) for i in range(state.shape[1])], 1)
    return ts, ys


def write_motion_capture(
    path: str | os.PathLike,
    fmt: MotionCaptureFormat,
    trials: Sequence[tuple[np.ndarray, np.ndarray]],
) -> str:
    """Write `trials` (each `(t, columns)` with `columns` the values of every column
    after `trial t`, in raw units) in the format of `fmt`. Returns the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("% " + " ".join(fmt.header) + "\n")
        for trial_id, (t, cols) in enumerate(trials):
            cols = np.asarray(cols)
            assert cols.shape == (len(t), len(fmt.columns) - 2), cols.shape
            for ti, row in zip(t, cols):
                f.write(
                    " ".join(f"{v: .16e}" for v in (float(trial_id), float(ti), *row))
                    + "\n"
                )
    return path
