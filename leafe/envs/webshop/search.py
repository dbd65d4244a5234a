"""WebShop's product search: BM25 as Lucene scores it, with `bm25s`.

The original indexes, per product, the lowercased `Title + Description + first bullet +
option text` with pyserini (Anserini's `DefaultEnglishAnalyzer`: Lucene's StandardTokenizer,
English possessive filter, lowercase, Lucene's 33 English stop words, Porter stemmer) and
searches with BM25 k1=0.9, b=0.4, returning the top 50. leafe scores with `bm25s`
(`method="lucene"`: idf = ln(1 + (N - df + 0.5) / (df + 0.5)), term part
tf / (tf + k1 (1 - b + b dl / avgdl)), as Lucene >= 8, which dropped the constant (k1 + 1)
factor) over tokens from `analyze`, sums repeated query terms (as Anserini's bag-of-words
query boosts them), and breaks ties by catalogue order (Lucene: by document id, i.e. index
order).

Where rankings can differ from pyserini's:
* tokenisation: `analyze` approximates Unicode word segmentation (UAX #29) with a regular
  expression (letters/digits joined by `.`, `'`, `_`; digits by `,` `;`; letters by `:`);
  scripts without spaces (CJK), emoji and some mixed punctuation split differently;
* stemming: PyStemmer's Porter (Snowball's port of the original algorithm) against Lucene's
  PorterStemFilter; a few rare words may stem differently;
* document length: Lucene stores it lossily in one byte (exact up to about 40 tokens, then
  rounded), leafe exactly; long documents of near-equal scores can swap places;
* arithmetic: Lucene computes in 32-bit floats with a precomputed length cache; bm25s in 32-bit
  floats in a different order: near-ties can swap.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from leafe.errors import UserError

#: Lucene's `EnglishAnalyzer.ENGLISH_STOP_WORDS_SET` (Anserini's default stop words).
LUCENE_STOP_WORDS = frozenset(
    "a an and are as at be but by for if in into is it no not of on or such that the their "
    "then there these they this to was will with".split()
)
K1, B = 0.9, 0.4

_TOKEN = re.compile(
    r"\w+(?:(?:[.'\u2019]|(?<=\d)[,;](?=\d)|(?<=[^\W\d_])[:](?=[^\W\d_]))\w+)*"
)
_POSSESSIVE = re.compile(r"['\u2019][sS]$")


def _stemmer() -> Any:
    try:
        import Stemmer
    except ImportError as e:
        raise UserError(
            "webshop: the search's Porter stemmer needs PyStemmer: pip install 'leafe[webshop]' "
            "(or pip install PyStemmer); or set the env option `stemmer: none`"
        ) from e
    return Stemmer.Stemmer("porter")


class Analyzer:
    """Text -> index terms, close to Anserini's default English analyzer."""

    def __init__(self, stem: bool = True):
        self._stem = _stemmer().stemWord if stem else None

    def __call__(self, text: str) -> list[str]:
        out = []
        for m in _TOKEN.finditer(text):
            tok = _POSSESSIVE.sub("", m.group(0)[:255]).lower()
            if not tok or tok in LUCENE_STOP_WORDS:
                continue
            out.append(self._stem(tok) if self._stem else tok)
        return out


def product_document(p: dict[str, Any]) -> str:
    """The text the original indexes for a product (lowercased)."""
    option_text = ", and ".join(f"{name}: {', '.join(values)}"
                                for name, values in p.get("options", {}).items())
    bullets = p.get("BulletPoints") or [""]
    return " ".join([p["Title"], p["Description"], bullets[0], option_text]).lower()


class SearchEngine:
    """BM25 over documents (one per product id), Lucene's formula and parameters."""

    def __init__(self, ids: list[str], documents: list[str], stem: bool = True,
                 k1: float = K1, b: float = B):
        import bm25s

        self.ids = list(ids)
        self.analyze = Analyzer(stem)
        corpus = [self.analyze(d) for d in documents]
        self._retriever = bm25s.BM25(k1=k1, b=b, method="lucene")
        # bm25s drops empty documents' rows oddly; an empty token keeps every row present.
        self._retriever.index([toks or [""] for toks in corpus], show_progress=False)
        self._vocab = self._retriever.vocab_dict

    @classmethod
    def for_products(cls, products: list[dict[str, Any]], stem: bool = True) -> SearchEngine:
        return cls([p["asin"] for p in products], [product_document(p) for p in products], stem)

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every document for `query` (0 where no term matches)."""
        ids = [self._vocab[t] for t in self.analyze(query) if t in self._vocab]
        if not ids:
            return np.zeros(len(self.ids), dtype=np.float32)
        return self._retriever.get_scores(ids)

    def search(self, query: str, k: int = 50) -> list[str]:
        """Ids of the (at most k) best matching documents, best first; ties by index order."""
        scores = self.scores(query)
        hits = np.flatnonzero(scores > 0)
        order = hits[np.lexsort((hits, -scores[hits]))]
        return [self.ids[i] for i in order[:k]]
