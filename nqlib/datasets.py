"""Real data that installs offline, for the book's application chapters.

:func:`stdlib_sentences` builds a text corpus nobody on this project wrote: the
English sentences of the docstrings of the Python standard library, read from
its source files with :mod:`ast` (no module is imported, so nothing runs).
"""

from __future__ import annotations

import ast
import functools
import re
import sysconfig
from pathlib import Path

import numpy as np

# A sentence ends at ., ! or ? followed by white space; docstrings wrap lines.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
# Lines that are code, doctest, tables or reST markup rather than prose.
_NOT_PROSE = re.compile(r"(>>>|\.\.\. |::|[{}\[\]=<>|`*#@\\_]|\(\)|\bhttps?:)")


def _docstrings(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                             ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield doc


def _sentences(doc: str, min_words: int, max_words: int):
    for paragraph in doc.split("\n\n"):
        text = " ".join(line.strip() for line in paragraph.splitlines())
        for sentence in _SENTENCE_END.split(text):
            words = sentence.split()
            if not (min_words <= len(words) <= max_words):
                continue
            if not sentence[0].isupper() or sentence[-1] not in ".!?":
                continue
            if _NOT_PROSE.search(sentence):
                continue
            yield sentence


def _stdlib_module_trees():
    """Parsed standard-library modules (top level and one package deep, tests
    and tools skipped), in path order, as ``(path relative to the standard
    library, tree)``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        if any(part in {"test", "tests", "idlelib", "site-packages",
                        "lib2to3", "turtledemo"} for part in path.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        yield path.relative_to(root), tree


@functools.cache
def _all_stdlib_sentences(min_words: int, max_words: int) -> tuple[str, ...]:
    found = set()
    for _, tree in _stdlib_module_trees():
        for doc in _docstrings(tree):
            found.update(_sentences(doc, min_words, max_words))
    return tuple(sorted(found))


def stdlib_sentences(n: int | None = None, *, seed: int = 0,
                     min_words: int = 6, max_words: int = 40) -> list[str]:
    """English sentences from the Python standard library's docstrings.

    Parameters
    ----------
    n : int, optional
        How many sentences to return, drawn without replacement with ``seed``;
        all of them (sorted) when omitted.
    seed : int
        Seed of the draw.
    min_words, max_words : int
        Keep sentences with this many words.

    Returns
    -------
    list of str

    Raises
    ------
    ValueError
        If ``n`` exceeds the number of sentences available.

    Notes
    -----
    The corpus depends on the Python version (it reads the running
    interpreter's standard library); on CPython 3.11 it holds several thousand
    sentences. Book: chapter "Quantizing a sentence-embedding model", label
    ``ch-minilm``.
    """
    pool = _all_stdlib_sentences(int(min_words), int(max_words))
    if n is None:
        return list(pool)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if n > len(pool):
        raise ValueError(f"n={n} exceeds the {len(pool)} sentences available")
    idx = np.random.default_rng(seed).choice(len(pool), size=n, replace=False)
    return [pool[i] for i in sorted(idx)]


@functools.cache
def _all_stdlib_documents(min_words: int, max_words: int):
    docs = []
    for path, tree in _stdlib_module_trees():
        module = ".".join(path.with_suffix("").parts)
        for doc in _docstrings(tree):
            text = " ".join(_sentences(doc, min_words, max_words))
            if text:
                docs.append((module, text))
    return tuple(docs)


def stdlib_documents(*, min_words: int = 6, max_words: int = 40
                     ) -> list[tuple[str, str]]:
    """The standard library's docstrings as running English text.

    Each docstring that has prose becomes one document: its sentences (the
    ones :func:`stdlib_sentences` keeps) in their original order, joined by
    spaces. Unlike the sentence pool, the text keeps its context -- what a
    language model's perplexity needs.

    Parameters
    ----------
    min_words, max_words : int
        Keep sentences with this many words.

    Returns
    -------
    list of (str, str)
        ``(module, text)`` in a fixed order (modules sorted by path, then
        the order of :func:`ast.walk`), so that a split by module is
        reproducible.

    Notes
    -----
    Book: chapter "Quantizing a language model", label ``ch-lm``.
    """
    return list(_all_stdlib_documents(int(min_words), int(max_words)))
