"""Retrieval-augmented generation: documents in (ingest), chunks stored and found (store, retrieve), cited answers
out (answer), measured on real questions (evaluate).

    import genlab.rag
    genlab.rag.index(["docs/"], "mydocs")
    ans = genlab.rag.ask("mydocs", "How do I reset my password?")
    print(ans.text, ans.sources())
"""

from __future__ import annotations


def index(paths, index, **kw):
    """`genlab rag index`: see `genlab.api.rag_index`."""
    from ..api import rag_index

    return rag_index(list(paths), index, **kw)


def ask(index, question: str, **kw):
    """`genlab rag ask`: see `genlab.api.rag_ask`."""
    from ..api import rag_ask

    return rag_ask(index, question, **kw)


def evaluate_index(index, qa, **kw):
    """`genlab rag eval`: see `genlab.api.rag_eval`."""
    from ..api import rag_eval

    return rag_eval(index, qa, **kw)
