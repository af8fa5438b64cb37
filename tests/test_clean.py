"""Cleaning and dedup units, against slow obvious references where there is maths."""

from __future__ import annotations


import pytest

from palm.data.clean import FilterConfig, decode, extract_html, normalize, quality_reason

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
