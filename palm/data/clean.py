"""Turn fetched bytes into clean text: decode, extract the main text, normalise, filter, sign.

Everything here works on one document at a time (pure functions), so the scrape stage can run it
in any number of worker processes; only deduplication (:mod:`palm.data.dedup`) is global.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass

from palm.core.config import check

_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?([A-Za-z0-9_\-:.]+)""", re.I)
_HEADER_CHARSET = re.compile(r"charset\s*=\s*[\"']?([A-Za-z0-9_\-:.]+)", re.I)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_BLANKS = re.compile(r"\n{3,}")
_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.I | re.S)


@dataclass(frozen=True)
class FilterConfig:
    """Quality filters applied to every extracted document (reasons are counted in stats.json)."""

    min_words: int = 50  # fewer whitespace-separated words → dropped as "too_short"
    max_words: int = 200_000  # more → dropped as "too_long"
    max_symbol_ratio: float = 0.35  # share of characters that are neither letters, digits nor space
    max_dup_line_ratio: float = 0.4  # share of non-empty lines that repeat an earlier line
    max_top_word_ratio: float = 0.25  # share of all words taken by the single most frequent word
    min_alpha_word_ratio: float = 0.5  # share of words containing at least one letter

    def __post_init__(self) -> None:
        check(self.min_words >= 0, "min_words", "must be >= 0")
        check(self.max_words > self.min_words, "max_words", "must be > min_words")
        for name in ("max_symbol_ratio", "max_dup_line_ratio", "max_top_word_ratio", "min_alpha_word_ratio"):
            check(0.0 <= getattr(self, name) <= 1.0, name, "must be between 0 and 1")


def decode(body: bytes, content_type: str = "") -> tuple[str, bool]:
    """Decode HTML or text bytes: HTTP charset, then ``<meta charset>``, then UTF-8, then
    cp1252. Returns ``(text, used_fallback)``; never raises on bad bytes."""
    candidates = []
    m = _HEADER_CHARSET.search(content_type or "")
    if m:
        candidates.append(m.group(1).decode() if isinstance(m.group(1), bytes) else m.group(1))
    m = _META_CHARSET.search(body[:4096])
    if m:
        candidates.append(m.group(1).decode("ascii", "replace"))
    candidates.append("utf-8")
    for enc in candidates:
        try:
            return body.decode(enc), False
        except (LookupError, UnicodeDecodeError):
            continue
    return body.decode("cp1252", errors="replace"), True


def _flatten_table_line(line: str) -> str:
    """Trafilatura renders tables as ``| a | b |`` rows; keep the cell text, drop empty cells."""
    if not line.startswith("|"):
        return line
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    return " ".join(c for c in cells if c)


def extract_html(html: str) -> tuple[str, str]:
    """Main text and title of an HTML page, without navigation boilerplate (trafilatura)."""
    import trafilatura  # imported lazily: it is slow to import and only workers need it

    doc = trafilatura.bare_extraction(
        html, include_tables=True, include_comments=False, include_links=False,
        favor_recall=True, with_metadata=True,
    )
    if doc is None:
        return "", _title_of(html)
    text = doc.text or ""
    title = doc.title or _title_of(html)
    return "\n".join(_flatten_table_line(l) for l in text.splitlines()), title


def _title_of(html: str) -> str:
    m = _TITLE.search(html[:20000])
    return re.sub(r"\s+", " ", m.group(1)).strip() if m else ""


def normalize(text: str) -> str:
    """Unicode NFC, no control characters, no trailing spaces, at most one blank line in a row."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return _BLANKS.sub("\n\n", text).strip()


def quality_reason(text: str, cfg: FilterConfig) -> str | None:
    """The name of the first filter ``text`` fails, or None when it passes them all."""
    words = text.split()
    n = len(words)
    if n < cfg.min_words or n == 0:  # no words is too short also with min_words 0
        return "too_short"
    if n > cfg.max_words:
        return "too_long"
    non_space = [c for c in text if not c.isspace()]
    symbols = sum(1 for c in non_space if not c.isalnum())
    if non_space and symbols / len(non_space) > cfg.max_symbol_ratio:
        return "symbol_ratio"
    lines = [l.strip() for l in text.split("\n") if l.strip()]
    if lines:
        dup = len(lines) - len(set(lines))
        if dup / len(lines) > cfg.max_dup_line_ratio:
            return "repeated_lines"
    top = Counter(w.lower() for w in words).most_common(1)[0][1]
    if n >= 20 and top / n > cfg.max_top_word_ratio:
        return "repeated_words"
    if sum(1 for w in words if any(c.isalpha() for c in w)) / n < cfg.min_alpha_word_ratio:
        return "few_alpha_words"
    return None
