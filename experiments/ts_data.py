"""Reading multivariate time-series classification data in the `.ts` format of the
UEA/UCR archive (as shipped inside sktime's wheel, e.g. JapaneseVowels and
BasicMotions under ``sktime/datasets/data/<name>/<name>_TRAIN.ts``).

A `.ts` file has ``#`` comment lines, then header lines (``@problemName``,
``@timeStamps false``, ``@univariate``, ``@dimensions D``, ``@equalLength``,
``@classLabel true <labels>``; case-insensitive), then ``@data`` and one case per
line: D comma-separated series separated by colons, then the class label,
``v,v,...:v,v,...:label``. Time stamps and missing values (``?``) are not
supported; every problem raises a `ValueError` that says what was expected.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import numpy as np


FORMAT = (
    "expected a UEA/UCR .ts file: '@' header lines (@dimensions D, @classLabel true "
    "<labels>, @timeStamps false), then '@data' and one case per line, "
    "'v,v,...:v,v,...:label' (D comma-separated series separated by colons, then the "
    "class label)"
)


@dataclasses.dataclass
class TSData:
    """Cases of a `.ts` file: `series[i]` has shape (length_i, dims)."""

    name: str
    series: list[np.ndarray]
    labels: np.ndarray  # strings
    class_labels: list[str]

    @property
    def dims(self) -> int:
        return self.series[0].shape[1]


def sktime_data_dir() -> str | None:
    """Where sktime keeps its bundled data sets (without importing sktime, which is
    slow), or None if sktime is not installed."""
    spec = importlib.util.find_spec("sktime")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data")


def find_split(name: str, split: str, data_dir: str | None = None) -> str:
    """The path of `<data_dir>/<name>/<name>_<split>.ts` (default: sktime's data)."""
    base = data_dir or sktime_data_dir()
    if base is None:
        raise FileNotFoundError(
            f"cannot find the {name} data: sktime is not installed. Install it "
            "(pip install -e '.[experiments]') or pass --data-dir, a folder holding "
            f"{name}/{name}_{split}.ts"
        )
    path = os.path.join(base, name, f"{name}_{split}.ts")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}; {FORMAT}")
    return path


def _header(lines: list[tuple[int, str]], path: str) -> tuple[dict, int]:
    """The `@` tags (lower-case name -> rest of the line) and the index of the first
    data line."""
    tags: dict[str, str] = {}
    for i, (lineno, line) in enumerate(lines):
        if not line.startswith("@"):
            raise ValueError(
                f"{path}:{lineno}: line before '@data' is not a tag; {FORMAT}"
            )
        tag, _, rest = line[1:].partition(" ")
        if tag.lower() == "data":
            return tags, i + 1
        tags[tag.lower()] = rest.strip()
    raise ValueError(f"{path}: no '@data' line; {FORMAT}")


def _check_header(tags: dict, path: str) -> tuple[int | None, list[str]]:
    if tags.get("timestamps", "false").lower() != "false":
        raise ValueError(f"{path}: time-stamped .ts files are not supported; {FORMAT}")
    label = tags.get("classlabel", "").split()
    if not label or label[0].lower() != "true" or len(label) < 2:
        raise ValueError(f"{path}: '@classLabel true <labels>' is missing; {FORMAT}")
    dims = tags.get("dimensions")
    try:
        return (int(dims) if dims is not None else None), label[1:]
    except ValueError:
        raise ValueError(f"{path}: bad '@dimensions {dims}'; {FORMAT}") from None


def _parse_case(
    line: str, lineno: int, path: str, dims: int | None, classes: list[str]
) -> tuple[np.ndarray, str]:
    *channels, label = line.split(":")
    where = f"{path}:{lineno}"
    if not channels:
        raise ValueError(f"{where}: no series before the label; {FORMAT}")
    if dims is not None and len(channels) != dims:
        raise ValueError(
            f"{where}: {len(channels)} dimensions, the header says {dims}; {FORMAT}"
        )
    if label.strip() not in classes:
        raise ValueError(f"{where}: label {label.strip()!r} not in {classes}; {FORMAT}")
    try:
        values = [[float(v) for v in c.split(",")] for c in channels]
    except ValueError:
        if "?" in line:
            raise ValueError(
                f"{where}: missing values ('?') are not supported"
            ) from None
        raise ValueError(f"{where}: cannot parse a number; {FORMAT}") from None
    if len({len(v) for v in values}) != 1:
        raise ValueError(f"{where}: dimensions of different lengths; {FORMAT}")
    series = np.asarray(values).T
    if not np.all(np.isfinite(series)):
        raise ValueError(f"{where}: non-finite values; {FORMAT}")
    return series, label.strip()


def load_ts(path: str | os.PathLike) -> TSData:
    """Read a `.ts` file (see the module docstring)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}; {FORMAT}")
    with open(path) as f:
        lines = [
            (n, line.strip())
            for n, line in enumerate(f, 1)
            if line.strip() and not line.startswith("#")
        ]
    if not lines:
        raise ValueError(f"{path}: the file is empty; {FORMAT}")
    tags, start = _header(lines, path)
    dims, classes = _check_header(tags, path)
    cases = [_parse_case(line, n, path, dims, classes) for n, line in lines[start:]]
    if not cases:
        raise ValueError(f"{path}: no cases after '@data'; {FORMAT}")
    if len({s.shape[1] for s, _ in cases}) != 1:
        raise ValueError(f"{path}: cases with different dimensions; {FORMAT}")
    return TSData(
        name=tags.get("problemname", os.path.basename(path)),
        series=[s for s, _ in cases],
        labels=np.asarray([lab for _, lab in cases]),
        class_labels=classes,
    )


def to_arrays(
    data: TSData, length: int, mean: np.ndarray, std: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Standardised values with a time channel, padded to `length` by holding the
    last observation, shape (cases, length, 1 + dims); integer labels.

    The time channel t = index / (length - 1) is held at the series' end as well, so
    the control is constant after it and a CDE's hidden state stops there: padding
    does not change the answer."""
    out = np.empty((len(data.series), length, 1 + data.dims), np.float32)
    grid = np.linspace(0.0, 1.0, length)
    for i, s in enumerate(data.series):
        if len(s) > length:
            raise ValueError(f"case {i} has {len(s)} > {length} observations")
        n = len(s)
        out[i, :n, 0] = grid[:n]
        out[i, :n, 1:] = (s - mean) / std
        out[i, n:] = out[i, n - 1]
    index = {c: k for k, c in enumerate(data.class_labels)}
    return out, np.asarray([index[c] for c in data.labels], np.int32)


def channel_stats(data: TSData) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of each dimension over all observations."""
    allobs = np.concatenate(data.series)
    return allobs.mean(0), np.maximum(allobs.std(0), 1e-8)
