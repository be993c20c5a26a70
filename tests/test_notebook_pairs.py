"""Every chapter has an output-free paired ``.ipynb`` (for Colab) in sync."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted(
    p for p in (ROOT / "book").glob("*.md") if "kernelspec:" in p.read_text()[:600]
)


def _cells(nb):
    return [(c.cell_type, c.source.strip(), sorted(c.metadata.get("tags", [])))
            for c in nb.cells]


@pytest.mark.parametrize("md", CHAPTERS, ids=lambda p: p.stem)
def test_paired_notebook_in_sync(md):
    jupytext = pytest.importorskip("jupytext")
    ipynb = md.with_suffix(".ipynb")
    assert ipynb.exists(), f"{ipynb.name} missing: run `make notebooks`"
    nb_md = jupytext.read(md)
    nb_ip = jupytext.read(ipynb)
    assert _cells(nb_md) == _cells(nb_ip), (
        f"{ipynb.name} is out of sync with {md.name}: run `make notebooks`"
    )
    for cell in nb_ip.cells:
        if cell.cell_type == "code":
            assert not cell.get("outputs"), f"{ipynb.name} has outputs"
