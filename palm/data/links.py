"""URL normalization and link extraction for the crawler, and the parser process that runs it.

The crawler parses pages in separate processes so that no page can raise in, or freeze, its event
loop: ``python -I links.py`` prints ``ready``, then answers each request on stdin (a frame: two
little-endian uint32 lengths, the page URL, the body) with one JSON line on stdout,
``{"links": [...]}`` or ``{"error": "..."}``, until stdin closes. It runs isolated (-I: no script
folder on sys.path, where palm/data/tokenize.py would shadow the standard module), so this file
imports only the standard library and lxml.
"""

from __future__ import annotations

import json
import struct
import sys
from urllib.parse import urljoin, urlsplit, urlunsplit

from lxml import etree

FRAME = struct.Struct("<II")  # len(url), len(body)


def normalize_url(url: str, base: str | None = None) -> str | None:
    """``url`` (resolved against ``base``) without fragment, scheme/host lowercased, default port
    dropped, empty path as "/"; None unless it is an http(s) URL with a host."""
    try:
        parts = urlsplit(urljoin(base, url.strip()) if base else url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme, host = parts.scheme.lower(), (parts.hostname or "")
    if scheme not in ("http", "https") or not host:
        return None
    if ":" in host:
        host = f"[{host}]"
    if port is not None and port != {"http": 80, "https": 443}[scheme]:
        host = f"{host}:{port}"
    return urlunsplit((scheme, host, parts.path or "/", parts.query, ""))


def extract_links(body: bytes, page_url: str) -> list[str]:
    """Normalized http(s) links of an HTML page, in document order, without duplicates. lxml
    (libxml2) recovers from any markup in linear time; a ``<base href>`` that is not a URL raises
    ValueError, as nothing on the page can then be resolved."""
    root = etree.fromstring(body, etree.HTMLParser(recover=True, no_network=True)) if body.strip() else None
    if root is None:  # nothing but whitespace or comments
        return []
    base = next(iter(root.xpath("//base/@href")), None)
    base = urljoin(page_url, str(base).strip()) if base else page_url
    links = (normalize_url(str(href), base) for href in root.xpath("//a/@href"))
    return list(dict.fromkeys(u for u in links if u))


def serve(stdin=sys.stdin.buffer, stdout=sys.stdout.buffer) -> None:  # noqa: ANN001
    """The parser process's loop (see the module docstring)."""
    stdout.write(b"ready\n")
    stdout.flush()
    while len(header := stdin.read(FRAME.size)) == FRAME.size:
        n_url, n_body = FRAME.unpack(header)
        url, body = stdin.read(n_url).decode("utf-8"), stdin.read(n_body)
        try:
            reply = {"links": extract_links(body, url)}
        except Exception as err:  # noqa: BLE001 - any failure drops this page, never the crawl
            reply = {"error": f"{type(err).__name__}: {err}"}
        stdout.write(json.dumps(reply).encode() + b"\n")
        stdout.flush()


if __name__ == "__main__":
    serve()
