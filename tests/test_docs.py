"""What the docs promise, runs: every docstring ``Examples`` section of the
library (doctest) and every ``python`` code block of the README."""

import doctest
import importlib
import pkgutil
import re
from pathlib import Path

import numpy as np
import pytest

import nqlib

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _modules():
    names = ["nqlib"]
    for info in pkgutil.walk_packages(nqlib.__path__, "nqlib."):
        names.append(info.name)
    return sorted(names)


def _has_examples(name):
    spec = importlib.util.find_spec(name)
    # a doctest prompt at the start of a (docstring) line
    return bool(spec and spec.origin and re.search(
        r"^\s*>>> ", Path(spec.origin).read_text(), re.M))


DOC_MODULES = [m for m in _modules() if _has_examples(m)]


def test_docstring_examples_exist():
    # the public entry points document themselves with runnable examples
    assert {"nqlib.theory", "nqlib.lattices"} <= set(DOC_MODULES), DOC_MODULES


@pytest.mark.parametrize("name", DOC_MODULES)
def test_docstring_examples(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)          # examples that save files write here
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = finder.find(module, name, extraglobs={"np": np, "nqlib": nqlib})
    assert tests, f"{name} has '>>>' but doctest found no examples"
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
    assert result.attempted > 0


def _readme_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_python_blocks():
    assert len(_readme_blocks()) >= 2


@pytest.mark.parametrize("index", range(len(_readme_blocks())))
def test_readme_block_runs(index, tmp_path, monkeypatch):
    """Each README block runs as written. Blocks that use a user's ``model``
    (and calibration ``batches``) get a small torch model to work on."""
    block = _readme_blocks()[index]
    monkeypatch.chdir(tmp_path)
    namespace = {}
    if re.search(r"\bmodel\b", block):
        torch = pytest.importorskip("torch")
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                    torch.nn.Linear(128, 32))
        batches = [torch.randn(16, 64) for _ in range(4)]
        namespace.update(torch=torch, model=model, batches=batches)
    exec(compile(block, f"README.md block {index}", "exec"), namespace)
    if "model" in namespace and "report" in namespace:
        from nqlib.nn import QuantLinear

        assert any(isinstance(m, QuantLinear) for m in namespace["model"].modules())
        out = namespace["model"](torch.randn(3, 64))
        assert out.shape == (3, 32) and torch.isfinite(out).all()


def test_readme_usage_example_does_what_it_says(tmp_path, monkeypatch):
    """The first example's comments: at most 4 bit/entry, a file written,
    and within 0.2 bit of the bound at 4 bit/entry."""
    block = re.search(r"## Using the library\s+```python\n(.*?)```",
                      README.read_text(), re.S)
    assert block, "README has no usage example"
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(block.group(1), "README.md", "exec"), namespace)
    assert namespace["QA"].bits_per_entry <= 4.0
    assert (tmp_path / "A.nq").exists()
    assert namespace["D"] < 0.011
    assert namespace["QA2"].to_bytes() == namespace["QA"].to_bytes()
