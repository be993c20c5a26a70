"""The README's usage example runs and does what its comments say."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    text = README.read_text()
    block = re.search(r"## Using the library\s+```python\n(.*?)```", text, re.S)
    assert block, "README has no usage example"
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(block.group(1), "README.md", "exec"), namespace)
    assert namespace["QA"].bits_per_entry <= 4.0
    assert (tmp_path / "A.nq").exists()
    assert namespace["D"] < 0.011  # within 0.2 bit of the bound at 4 bit/entry
