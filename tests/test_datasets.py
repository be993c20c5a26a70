import pytest

from nqlib.datasets import stdlib_sentences


def test_corpus_is_large_prose_and_deterministic():
    pool = stdlib_sentences()
    assert len(pool) > 2000
    assert len(set(pool)) == len(pool)
    for s in pool[:: max(1, len(pool) // 200)]:
        assert s[0].isupper() and s[-1] in ".!?"
        assert 6 <= len(s.split()) <= 40
        assert ">>>" not in s
    a = stdlib_sentences(300, seed=3)
    assert a == stdlib_sentences(300, seed=3)
    assert a != stdlib_sentences(300, seed=4)
    assert set(a) <= set(pool)


@pytest.mark.parametrize("n", [0, -1, 2.5, True, 10**9])
def test_bad_n_is_rejected(n):
    with pytest.raises(ValueError, match="n"):
        stdlib_sentences(n)


def test_documents_are_prose_in_order_and_deterministic():
    from nqlib.datasets import stdlib_documents

    docs = stdlib_documents()
    assert len(docs) > 1000 and len({m for m, _ in docs}) > 100
    assert docs == stdlib_documents()
    pool = set(stdlib_sentences())
    for module, text in docs[:: max(1, len(docs) // 100)]:
        assert module and text[0].isupper() and text[-1] in ".!?"
        # every sentence of a document is one of the corpus's sentences
        first = text.split(". ")[0]
        assert any(s.startswith(first) for s in pool)
