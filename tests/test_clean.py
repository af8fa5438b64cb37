"""Cleaning and dedup units, against slow obvious references where there is maths."""

from __future__ import annotations

import random

import numpy as np
import pytest

from palm.data.clean import FilterConfig, decode, extract_html, normalize, quality_reason
from palm.data.dedup import DedupConfig, duplicates, signature

PROSE = ("The quick brown fox jumps over the lazy dog while the cat watches from a sunny window "
         "and thinks about lunch, the weather, and the long history of foxes in literature. ")


def test_decode_charsets():
    latin = "Café crème, naïve façade, déjà vu."
    assert decode(latin.encode("iso-8859-1"), "text/html; charset=iso-8859-1")[0] == latin
    html = f'<html><head><meta charset="windows-1252"></head><body>{latin}</body></html>'
    assert latin in decode(html.encode("cp1252"), "text/html")[0]
    # no charset anywhere and invalid UTF-8: falls back to cp1252, never raises
    out, fallback = decode(latin.encode("cp1252"), "text/html")
    assert fallback and out == latin
    assert decode("Grüße".encode("utf-8"), "")[0] == "Grüße"


def test_normalize():
    assert normalize("e\u0301\x07 a  \r\n\n\n\nb") == "é a\n\nb"


def test_extract_drops_navigation():
    body = "<p>" + PROSE * 5 + "</p>"
    nav = "<nav><a href='/'>Home</a> | <a href='/prev'>Prev</a> | <a href='/next'>Next</a></nav>"
    html = f"<html><head><title>Foxes</title></head><body>{nav}<main><h1>Foxes</h1>{body}</main>" \
           f"<footer>Copyright footer links</footer></body></html>"
    text, title = extract_html(html)
    assert "quick brown fox" in text and title == "Foxes"
    assert "Prev" not in text and "Next" not in text


@pytest.mark.parametrize("text, reason", [
    ("too few words here", "too_short"),
    ("{}[]()<>;:=+-*/ " * 40 + "word " * 10, "symbol_ratio"),
    (("same line again and again\n" * 30) + PROSE, "repeated_lines"),
    ("spam " * 100 + PROSE, "repeated_words"),
    (PROSE * 3, None),
])
def test_quality_filters(text, reason):
    assert quality_reason(text, FilterConfig(min_words=20)) == reason


def naive_jaccard(a: str, b: str, k: int) -> float:
    def sh(t):
        w = t.lower().split()
        return {" ".join(w[i:i + k]) for i in range(max(1, len(w) - k + 1))}
    sa, sb = sh(a), sh(b)
    return len(sa & sb) / len(sa | sb)


def test_minhash_estimates_jaccard():
    """The signature's Jaccard estimate is within 0.12 of the exact value (128 permutations)."""
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(400)]
    cfg = DedupConfig(num_perm=128)
    for _ in range(20):
        a = [rng.choice(vocab) for _ in range(300)]
        b = list(a)
        for _ in range(rng.randint(0, 120)):
            b[rng.randrange(len(b))] = rng.choice(vocab)
        ta, tb = " ".join(a), " ".join(b)
        est = float(np.mean(signature(ta, cfg) == signature(tb, cfg)))
        assert abs(est - naive_jaccard(ta, tb, cfg.shingle_words)) < 0.12


def test_duplicates_exact_and_near():
    cfg = DedupConfig(threshold=0.8)
    base = PROSE * 6
    near = base.replace("lunch", "dinner", 1)  # one word changed: Jaccard ~0.97
    other = " ".join(reversed(base.split())) + " entirely different ending with new words"
    docs = [("a", base), ("a", base), ("b", near), ("c", other)]
    reasons, n_exact, n_near = duplicates([(s, signature(t, cfg)) for s, t in docs], cfg)
    assert reasons == [None, "exact_duplicate", "near_duplicate", None]
    assert (n_exact, n_near) == (1, 1)
    assert naive_jaccard(base, near, cfg.shingle_words) > 0.8 > naive_jaccard(base, other, cfg.shingle_words)
