"""A polite, bounded, SSRF-guarded breadth-first HTTP crawler.

:func:`crawl` starts from ``CrawlConfig.seed_urls``, fetches pages with one ``httpx.AsyncClient``
and hands each accepted page (HTML, XHTML or plain text) to ``on_page`` on the calling thread, in
order of completion. Links in HTML pages are followed breadth-first up to ``max_depth``; every
normalized URL is fetched at most once.

Politeness: robots.txt is fetched once per origin and obeyed; requests to one host are limited to
``concurrency`` at a time and start at least ``delay_s`` apart; 429, 5xx and connection errors are
retried with exponential backoff, honouring ``Retry-After``.

Safety: before every request (robots.txt and each redirect hop included) the host is resolved and
refused unless every address is public (or the host is in ``allow_hosts``); the request is then
sent to the checked address (the Host header and TLS SNI keep the name), so a second DNS answer
cannot point it elsewhere. Redirects are followed by hand, each hop re-checked. Bodies are
streamed and cut at ``max_bytes``; other content types are refused from their headers alone.
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from html.parser import HTMLParser
from typing import Callable
from urllib.parse import urljoin, urlsplit, urlunsplit
from urllib.robotparser import RobotFileParser

import httpx
from tqdm import tqdm

from palm.config import check
from palm.errors import UserError

ACCEPTED_TYPES = ("text/html", "application/xhtml+xml", "text/plain")
HTML_TYPES = ("text/html", "application/xhtml+xml")
MAX_RETRY_AFTER_S = 30.0
MAX_ROBOTS_BYTES = 500_000


@dataclass(frozen=True)
class CrawlConfig:
    # Start URLs (http or https), fetched at depth 0.
    seed_urls: tuple[str, ...] = ()
    # Host names or IPs exempt from the SSRF guard, e.g. "127.0.0.1" for a local server.
    allow_hosts: tuple[str, ...] = ()
    # Follow links (and redirects) only to the seed hosts and allow_hosts.
    same_host: bool = True
    # Stop after this many pages have been handed to on_page.
    max_pages: int = 1000
    # Link distance from a seed to follow (a seed is depth 0; 0 fetches the seeds only).
    max_depth: int = 3
    # Largest body accepted per page, in bytes (after content decoding).
    max_bytes: int = 2_000_000
    # Requests in flight at once to one host.
    concurrency: int = 4
    # Minimum seconds between the starts of two requests to one host.
    delay_s: float = 0.0
    # Seconds allowed for connecting and for each read/write of one request.
    timeout_s: float = 20.0
    # Extra attempts after a 429, a 5xx or a connection error.
    retries: int = 3
    # First backoff wait in seconds, doubled on each retry (Retry-After, capped at 30 s, wins).
    backoff_s: float = 0.5
    # User-Agent header sent, and the agent name matched against robots.txt.
    user_agent: str = "palm-rlhf-crawler/0.1 (+https://github.com/palm-rlhf/palm-rlhf)"
    # Obey robots.txt (a 5xx or unreachable robots.txt disallows the whole host).
    respect_robots: bool = True
    # Redirect hops followed per URL; more, or a loop, skips it.
    max_redirects: int = 5

    def __post_init__(self) -> None:
        for url in self.seed_urls:
            parts = urlsplit(url) if isinstance(url, str) else None
            check(parts is not None and parts.scheme.lower() in ("http", "https") and bool(parts.hostname),
                  "seed_urls", f"expected http(s) URLs with a host, got {url!r}")
        check(all(isinstance(h, str) and h for h in self.allow_hosts), "allow_hosts", "expected host names")
        check(self.max_pages >= 1, "max_pages", f"must be >= 1, got {self.max_pages}")
        check(self.max_depth >= 0, "max_depth", f"must be >= 0, got {self.max_depth}")
        check(self.max_bytes > 0, "max_bytes", f"must be > 0, got {self.max_bytes}")
        check(self.concurrency >= 1, "concurrency", f"must be >= 1, got {self.concurrency}")
        check(self.delay_s >= 0, "delay_s", f"must be >= 0, got {self.delay_s}")
        check(self.timeout_s > 0, "timeout_s", f"must be > 0, got {self.timeout_s}")
        check(self.retries >= 0, "retries", f"must be >= 0, got {self.retries}")
        check(self.backoff_s >= 0, "backoff_s", f"must be >= 0, got {self.backoff_s}")
        check(bool(self.user_agent.strip()), "user_agent", "must not be empty")
        check(self.max_redirects >= 0, "max_redirects", f"must be >= 0, got {self.max_redirects}")


@dataclass
class Page:
    url: str  # final URL after redirects (normalized)
    status: int  # HTTP status of the final response
    content_type: str  # Content-Type header as sent, e.g. "text/html; charset=iso-8859-1"
    body: bytes  # decoded body (gzip etc. undone), at most max_bytes
    fetched_at: str  # ISO-8601 UTC time the response arrived
    depth: int  # link distance from the seed it was reached from


@dataclass
class CrawlStats:
    fetched: int = 0  # pages handed to on_page
    # URLs not fetched, by reason: robots, ssrf, content_type, oversize, http_error, network_error,
    # redirect_loop, out_of_scope, filtered, duplicate (a redirect to an already-seen URL);
    # robots_unavailable counts hosts whose robots.txt failed (then treated as disallow-all).
    skipped: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"fetched": self.fetched, "skipped": dict(sorted(self.skipped.items()))}


class _Skip(Exception):
    """A URL is not fetched: ``reason`` is a CrawlStats key, the message says why for a human."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


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


def is_public_address(addr: str) -> bool:
    """True unless ``addr`` is private, loopback, link-local, multicast, reserved, unspecified or
    otherwise not globally routable (IPv4-mapped IPv6 judged as its IPv4 address)."""
    ip = ipaddress.ip_address(addr.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    bad = ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved
    return not (bad or ip.is_unspecified) and ip.is_global


async def _resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (raises socket.gaierror when it does not resolve)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


class _Links(HTMLParser):
    """Collects ``<a href>`` values and the first ``<base href>``."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.hrefs: list[str] = []
        self.base: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        href = dict(attrs).get("href")
        if href and tag == "a":
            self.hrefs.append(href)
        elif href and tag == "base" and self.base is None:
            self.base = href


def extract_links(body: bytes, page_url: str) -> list[str]:
    """Normalized http(s) links of an HTML page, in document order, without duplicates."""
    parser = _Links()
    parser.feed(body.decode("utf-8", errors="replace"))
    parser.close()
    base = urljoin(page_url, parser.base) if parser.base else page_url
    links = (normalize_url(href, base) for href in parser.hrefs)
    return list(dict.fromkeys(u for u in links if u))


def _media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after", "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = (email.utils.parsedate_to_datetime(value) - datetime.now(timezone.utc)).total_seconds()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


class _Host:
    """Per-host politeness: at most ``concurrency`` requests at once, starts ``delay_s`` apart."""

    def __init__(self, concurrency: int, delay_s: float):
        self.slots = asyncio.Semaphore(concurrency)
        self.delay_s = delay_s
        self.next_start = 0.0
        self.lock = asyncio.Lock()

    async def wait_turn(self) -> None:
        async with self.lock:
            now = time.monotonic()
            if self.next_start > now:
                await asyncio.sleep(self.next_start - now)
            self.next_start = time.monotonic() + self.delay_s


class _Crawler:
    def __init__(self, cfg: CrawlConfig, client: httpx.AsyncClient, on_page: Callable[[Page], None],
                 url_filter: Callable[[str], bool] | None, bar: tqdm):
        self.cfg, self.client, self.on_page, self.url_filter, self.bar = cfg, client, on_page, url_filter, bar
        self.allow = {h.lower().strip("[]") for h in cfg.allow_hosts}
        self.scope = self.allow | {urlsplit(u).hostname or "" for u in cfg.seed_urls}
        self.stats = CrawlStats()
        self.skipped: Counter[str] = Counter()
        self.seed_errors: dict[str, str] = {}
        self.seen: set[str] = set()
        self.queue: asyncio.Queue[tuple[str, int]] = asyncio.Queue()
        self.hosts: dict[str, _Host] = {}
        self.robots: dict[str, RobotFileParser] = {}
        self.robots_trouble: dict[str, str] = {}  # origin -> why its robots.txt counts as disallow-all
        self.robots_locks: dict[str, asyncio.Lock] = {}
        self.done = asyncio.Event()
        self.error: BaseException | None = None

    async def run(self) -> CrawlStats:
        for seed in self.cfg.seed_urls:
            url = normalize_url(seed)
            if url and url not in self.seen:
                self.seen.add(url)
                self.queue.put_nowait((url, 0))
        n_workers = min(64, self.cfg.concurrency * max(1, len(self.scope)))
        workers = [asyncio.create_task(self._worker()) for _ in range(n_workers)]
        drained = asyncio.create_task(self.queue.join())
        stopped = asyncio.create_task(self.done.wait())
        await asyncio.wait([drained, stopped], return_when=asyncio.FIRST_COMPLETED)
        for task in [*workers, drained, stopped]:
            task.cancel()
        await asyncio.gather(*workers, drained, stopped, return_exceptions=True)
        if self.error is not None:
            raise self.error
        self.stats.skipped = dict(self.skipped)
        return self.stats

    async def _worker(self) -> None:
        while True:
            url, depth = await self.queue.get()
            try:
                if not self.done.is_set():
                    self._deliver(await self._fetch(url, depth))
            except _Skip as skip:
                self.skipped[skip.reason] += 1
                if depth == 0:
                    self.seed_errors.setdefault(url, str(skip))
            except Exception as err:  # a bug or an on_page failure: stop and re-raise in crawl()
                self.error = err
                self.done.set()
            finally:
                self.queue.task_done()

    def _deliver(self, page: Page) -> None:
        if self.stats.fetched >= self.cfg.max_pages:
            return
        self.stats.fetched += 1
        self.on_page(page)
        self.bar.update(1)
        if self.stats.fetched >= self.cfg.max_pages:
            self.done.set()
        elif page.depth < self.cfg.max_depth and _media_type(page.content_type) in HTML_TYPES:
            for link in extract_links(page.body, page.url):
                self._enqueue(link, page.depth + 1)

    def _enqueue(self, url: str, depth: int) -> None:
        if url in self.seen:
            return
        self.seen.add(url)
        if not self._in_scope(url):
            self.skipped["out_of_scope"] += 1
        elif self.url_filter is not None and not self.url_filter(url):
            self.skipped["filtered"] += 1
        else:
            self.queue.put_nowait((url, depth))

    def _in_scope(self, url: str) -> bool:
        return not self.cfg.same_host or (urlsplit(url).hostname or "") in self.scope

    async def _fetch(self, url: str, depth: int) -> Page:
        """One page, following redirects by hand; raises _Skip when it is not to be had."""
        chain = [url]
        while True:
            try:
                pin = await self._guard(chain[-1])
                if self.cfg.respect_robots and not await self._robots_allow(chain[-1]):
                    trouble = self.robots_trouble.get(_origin(chain[-1]))
                    raise _Skip("robots", f"was not fetched: {trouble}" if trouble else "is disallowed by robots.txt")
                resp, location, body = await self._get(chain[-1], pin, page=True)
            except _Skip as skip:
                if len(chain) > 1:
                    raise _Skip(skip.reason, f"redirects to {chain[-1]}, which {skip}") from None
                raise
            if location is None:
                return Page(url=chain[-1], status=resp.status_code,
                            content_type=resp.headers.get("content-type", ""), body=body,
                            fetched_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), depth=depth)
            self._check_hop(chain, location)
            if location in self.seen:
                raise _Skip("duplicate", f"redirects to {location}, already crawled")
            self.seen.add(location)
            chain.append(location)

    def _check_hop(self, chain: list[str], location: str) -> None:
        if location in chain:
            raise _Skip("redirect_loop", f"redirects in a loop back to {location}")
        if len(chain) > self.cfg.max_redirects:
            raise _Skip("redirect_loop", f"redirects more than max_redirects={self.cfg.max_redirects} times")
        if not self._in_scope(location):
            raise _Skip("out_of_scope", f"redirects out of scope to {location}")

    async def _get(self, url: str, pin: str | None, *, page: bool) -> tuple[httpx.Response, str | None, bytes]:
        """GET one hop: (response, normalized redirect target or None, body). For pages, non-2xx
        and refused types/sizes raise _Skip; for robots.txt the caller judges the status."""
        slot = self.hosts.setdefault(_origin(url), _Host(self.cfg.concurrency, self.cfg.delay_s))
        async with slot.slots:
            resp = await self._send(url, pin, slot)
            try:
                if resp.is_redirect:
                    target = normalize_url(resp.headers["location"], url)
                    if target is None:
                        raise _Skip("http_error", "redirects to a non-http(s) URL")
                    return resp, target, b""
                if not page:
                    return resp, None, await self._read(resp, MAX_ROBOTS_BYTES) if resp.is_success else b""
                if not resp.is_success:
                    retried = resp.status_code == 429 or resp.status_code >= 500
                    raise _Skip("http_error", f"answered HTTP {resp.status_code}"
                                + (f" after {self.cfg.retries} retries" if retried else ""))
                media = _media_type(resp.headers.get("content-type", ""))
                if media not in ACCEPTED_TYPES:
                    raise _Skip("content_type", f"is {media or 'of no content type'}, not HTML or text")
                return resp, None, await self._read(resp, self.cfg.max_bytes)
            finally:
                await resp.aclose()

    async def _guard(self, url: str) -> str | None:
        """The checked address to connect to, or None for an allow-listed host; raises _Skip."""
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
        if host.lower() in self.allow:
            return None
        try:
            addrs = await _resolve(host, port)
        except (socket.gaierror, UnicodeError):
            raise _Skip("network_error", f"did not resolve (DNS lookup failed for {host})")
        blocked = [a for a in addrs if not is_public_address(a)]
        if blocked or not addrs:
            raise _Skip("ssrf", f"is refused: {host} resolves to non-public address "
                        f"{blocked[0] if blocked else '(none)'} and is not in allow_hosts")
        return addrs[0]

    async def _send(self, url: str, pin: str | None, slot: _Host) -> httpx.Response:
        """Send with retries on 429/5xx/connection errors; returns the last response, open."""
        headers = {"User-Agent": self.cfg.user_agent}
        target, extensions = httpx.URL(url), {}
        if pin is not None:
            headers["Host"] = target.netloc.decode("ascii")
            if target.scheme == "https":
                extensions["sni_hostname"] = target.host
            target = target.copy_with(host=pin)
        for attempt in range(self.cfg.retries + 1):
            await slot.wait_turn()
            wait = self.cfg.backoff_s * 2**attempt
            try:
                request = self.client.build_request("GET", target, headers=headers, extensions=extensions)
                resp = await self.client.send(request, stream=True)
            except httpx.TransportError as err:
                if attempt == self.cfg.retries:
                    raise _Skip("network_error", f"could not be fetched ({type(err).__name__}: {err})")
            else:
                if resp.status_code != 429 and resp.status_code < 500 or attempt == self.cfg.retries:
                    return resp
                retry_after = _retry_after(resp)
                wait = wait if retry_after is None else retry_after
                await resp.aclose()
            await asyncio.sleep(wait)
        raise AssertionError("unreachable")

    async def _read(self, resp: httpx.Response, limit: int) -> bytes:
        length = resp.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise _Skip("oversize", f"is {length} bytes, over max_bytes={limit}")
        body = bytearray()
        async for chunk in resp.aiter_bytes():
            body += chunk
            if len(body) > limit:
                raise _Skip("oversize", f"is over max_bytes={limit} bytes")
        return bytes(body)

    async def _robots_allow(self, url: str) -> bool:
        origin = _origin(url)
        async with self.robots_locks.setdefault(origin, asyncio.Lock()):
            if origin not in self.robots:
                self.robots[origin] = await self._fetch_robots(origin)
        return self.robots[origin].can_fetch(self.cfg.user_agent, url)

    async def _fetch_robots(self, origin: str) -> RobotFileParser:
        """RFC 9309: 2xx is parsed, 4xx allows all, 5xx or unreachable disallows all."""
        parser, chain, rules = RobotFileParser(), [f"{origin}/robots.txt"], None
        try:
            while True:
                resp, location, body = await self._get(chain[-1], await self._guard(chain[-1]), page=False)
                if location is None:
                    break
                if location in chain or len(chain) > self.cfg.max_redirects:
                    raise _Skip("redirect_loop", "robots.txt redirect loop")
                chain.append(location)
            if resp.is_success:
                rules = body.decode("utf-8", errors="replace").splitlines()
            elif 400 <= resp.status_code < 500:
                rules = []
        except _Skip as skip:
            trouble = f"robots.txt {skip}"
        else:
            trouble = f"robots.txt answered HTTP {resp.status_code}"
        if rules is None:
            self.skipped["robots_unavailable"] += 1
            self.robots_trouble[origin] = trouble + ", so the host counts as disallowed"
            rules = ["User-agent: *", "Disallow: /"]
        parser.parse(rules)
        return parser


def crawl(cfg: CrawlConfig, on_page: Callable[[Page], None], *,
          url_filter: Callable[[str], bool] | None = None, progress: bool = True) -> CrawlStats:
    """Crawl from ``cfg.seed_urls``, calling ``on_page`` for each accepted page; the stats say
    what was fetched and what was skipped why. Raises UserError when not a single page came back.
    Runs its own event loop (asyncio.run): call it from synchronous code, not from a coroutine."""
    if not cfg.seed_urls:
        raise UserError("crawl has no seed URLs; set scrape.seed_urls")
    timeout = httpx.Timeout(cfg.timeout_s)
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=16)
    bar = tqdm(total=cfg.max_pages, unit="page", desc="crawl", disable=not progress or not sys.stderr.isatty())

    async def main() -> tuple[CrawlStats, dict[str, str]]:
        # trust_env=False: no proxy from the environment may take the request past the SSRF guard.
        async with httpx.AsyncClient(timeout=timeout, limits=limits, follow_redirects=False,
                                     trust_env=False) as client:
            crawler = _Crawler(cfg, client, on_page, url_filter, bar)
            return await crawler.run(), crawler.seed_errors

    try:
        stats, seed_errors = asyncio.run(main())
    finally:
        bar.close()
    if stats.fetched == 0:
        why = "; ".join(f"seed {url} {why}" for url, why in seed_errors.items())
        raise UserError(f"crawl fetched no page: {why or 'no seed gave a page'}; check scrape.seed_urls")
    return stats
