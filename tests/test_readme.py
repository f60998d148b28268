"""The README's quickstart runs as written and prints a tiny gradient difference;
the docs page on scaling out is the README's section."""

import pathlib
import re
import subprocess
import sys


README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs_as_written(tmp_path):
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    quickstart = next(b for b in blocks if "ReversibleAdjoint()" in b)
    script = tmp_path / "quickstart.py"
    script.write_text(quickstart)
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr
    difference = float(out.stdout.strip().split()[-1])
    assert difference < 1e-12


def test_scaling_out_page_is_the_readme_section():
    """`docs/scaling_out.md` is the README's "Scaling out" section, as a page."""
    text = README.read_text()
    start = text.index("## Scaling out: `jax.shard_map`")
    section = text[start : text.index("\n## ", start + 1)].strip()
    page = (README.parent / "docs" / "scaling_out.md").read_text().strip()
    assert page == section.replace("## Scaling out", "# Scaling out", 1)
