"""A polite, bounded, SSRF-guarded breadth-first HTTP crawler.

:func:`crawl` starts from ``CrawlConfig.seed_urls``, fetches pages with one ``httpx.AsyncClient``
and hands each accepted page (HTML, XHTML or plain text) to ``on_page`` on the calling thread, in
order of completion. Links in HTML pages are followed breadth-first, one depth at a time, up to
``max_depth``; every normalized URL is fetched at most once, at its link distance from a seed.

Politeness: robots.txt is fetched once per origin and obeyed; requests to one host are limited to
``concurrency`` at a time and start at least ``delay_s`` apart; 429, 5xx and connection errors are
retried with exponential backoff, honouring ``Retry-After``.

Safety: before every request (robots.txt and each redirect hop included) the port must be 80, 443
or allow-listed, and the host is resolved and refused unless every address is public (or the host
is in ``allow_hosts``); the connection is then opened to the checked address, so a second DNS
answer cannot point it elsewhere, while connection pools and TLS certificate checks stay keyed by
the host name of the URL and no cookies are kept. Redirects are followed by hand, each hop
re-checked. Bodies are streamed and decoded here, in bounded steps, so at most ``max_bytes``
*decoded* bytes are ever held per request; only identity, gzip and deflate are accepted. Every
request has a total deadline on top of the per-read timeout. Links are extracted by lxml in worker
processes with a time budget per page, so no page can raise in, or freeze, the event loop.

Memory: at most ``min(64, concurrency x hosts)`` pages are in flight, each holding at most
``max_bytes`` (a few copies while it is handed on), plus the link frontier, which is capped at
``FRONTIER_PER_PAGE x max_pages`` URLs, plus the parser processes (``PARSERS``, each one page
and its tree at a time).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import ipaddress
import json
import select
import socket
import subprocess
import sys
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.cookiejar import CookieJar, DefaultCookiePolicy
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit
from urllib.robotparser import RobotFileParser

import httpcore
import httpx
from tqdm import tqdm

from palm.core.config import check
from palm.core.errors import UserError
from palm.data.links import FRAME, extract_links, normalize_url  # noqa: F401 - extract_links re-exported

ACCEPTED_TYPES = ("text/html", "application/xhtml+xml", "text/plain")
HTML_TYPES = ("text/html", "application/xhtml+xml")
MAX_RETRY_AFTER_S = 30.0
MAX_ROBOTS_BYTES = 500_000
STANDARD_PORTS = (80, 443)
PARSERS = 2  # link-extraction processes (each parses one page at a time)
LINKS_SCRIPT = str(Path(__file__).with_name("links.py"))
FRONTIER_PER_PAGE = 20  # URLs kept in the frontier per page that may be fetched; more are dropped
# Every reason a URL is not fetched (CrawlStats.skipped), always reported, zeros included.
SKIP_REASONS = (
    "robots", "robots_unavailable", "bad_url", "ssrf", "port", "content_type", "encoding", "oversize", "deadline",
    "http_error", "network_error", "redirect_loop", "out_of_scope", "filtered", "duplicate",
    "frontier_full", "parse_error", "parse_timeout",
)


@dataclass(frozen=True)
class CrawlConfig:
    # Start URLs (http or https), fetched at depth 0.
    seed_urls: tuple[str, ...] = ()
    # Hosts exempt from the SSRF address check: "host" (on ports 80, 443 and allow_ports) or
    # "host:port" (that port only), e.g. "127.0.0.1:8000" for a local server.
    allow_hosts: tuple[str, ...] = ()
    # Ports allowed on every host besides 80 and 443 (other ports are refused, as `port`).
    allow_ports: tuple[int, ...] = ()
    # Follow links (and redirects) only to the seed hosts and allow_hosts.
    same_host: bool = True
    # Stop after this many pages have been handed to on_page.
    max_pages: int = 1000
    # Link distance from a seed to follow (a seed is depth 0; 0 fetches the seeds only).
    max_depth: int = 3
    # Largest body accepted per page (decoded) or per record of a WARC/WET file, in bytes.
    max_bytes: int = 2_000_000
    # Requests in flight at once to one host.
    concurrency: int = 4
    # Minimum seconds between the starts of two requests to one host.
    delay_s: float = 0.0
    # Seconds allowed for connecting and for each read/write of one request.
    timeout_s: float = 20.0
    # Seconds allowed for one whole request, headers and body (a server that drips bytes is cut off).
    request_deadline_s: float = 60.0
    # Seconds of link extraction allowed per HTML page; a page over it is dropped (parse_timeout).
    parse_timeout_s: float = 10.0
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
        for entry in self.allow_hosts:
            check(_host_port(entry) is not None, "allow_hosts", f"expected \"host\" or \"host:port\", got {entry!r}")
        for port in self.allow_ports:
            check(1 <= port <= 65535, "allow_ports", f"expected ports 1-65535, got {port}")
        check(self.max_pages >= 1, "max_pages", f"must be >= 1, got {self.max_pages}")
        check(self.max_depth >= 0, "max_depth", f"must be >= 0, got {self.max_depth}")
        check(self.max_bytes > 0, "max_bytes", f"must be > 0, got {self.max_bytes}")
        check(self.concurrency >= 1, "concurrency", f"must be >= 1, got {self.concurrency}")
        check(self.delay_s >= 0, "delay_s", f"must be >= 0, got {self.delay_s}")
        check(self.timeout_s > 0, "timeout_s", f"must be > 0, got {self.timeout_s}")
        check(self.request_deadline_s > 0, "request_deadline_s", f"must be > 0, got {self.request_deadline_s}")
        check(self.parse_timeout_s > 0, "parse_timeout_s", f"must be > 0, got {self.parse_timeout_s}")
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
    # URLs not fetched (or pages dropped), by reason (SKIP_REASONS): robots, bad_url (one the
    # HTTP client refuses, e.g. with control characters), ssrf, port (not 80,
    # 443 or allow-listed), content_type, encoding (stacked, unknown or corrupt Content-Encoding),
    # oversize (over max_bytes, decoded), deadline (over request_deadline_s), http_error,
    # network_error, redirect_loop, out_of_scope, filtered, duplicate (a redirect to an
    # already-seen URL), frontier_full (a link beyond the frontier cap), parse_error and
    # parse_timeout (links could not be extracted, the page is dropped); robots_unavailable
    # counts hosts whose robots.txt failed (then treated as disallow-all).
    skipped: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"fetched": self.fetched, "skipped": {r: self.skipped.get(r, 0) for r in SKIP_REASONS}}


class _Skip(Exception):
    """A URL is not fetched: ``reason`` is a CrawlStats key, the message says why for a human."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def _host_port(entry: str) -> tuple[str, int | None] | None:
    """("host", port or None) of an allow_hosts entry ("host", "host:port", "[v6]:port"), or None."""
    try:
        parts = urlsplit(f"//{entry}") if isinstance(entry, str) else None
        port = parts.port if parts else None
    except ValueError:
        return None
    if parts is None or not parts.hostname or parts.path or parts.query or parts.username:
        return None
    return parts.hostname, port


_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address routes to or stands for: 6to4, Teredo (server and
    client), NAT64 and the deprecated IPv4-compatible form."""
    if ip.sixtofour is not None:
        return [ip.sixtofour]
    if ip.teredo is not None:
        return list(ip.teredo)
    if any(ip in net for net in _NAT64) or ip in _IPV4_COMPATIBLE:
        return [ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)]
    return []


def _routable(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    bad = ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved
    return not (bad or ip.is_unspecified) and ip.is_global


def is_public_address(addr: str) -> bool:
    """True unless ``addr`` is private, loopback, link-local, multicast, reserved, unspecified or
    otherwise not globally routable. IPv4-mapped IPv6 is judged as its IPv4 address; other IPv6
    forms that embed IPv4 (6to4, Teredo, NAT64, IPv4-compatible) must pass as themselves *and*
    as every IPv4 address they embed, whatever this Python's ipaddress tables say about them."""
    ip = ipaddress.ip_address(addr.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return _routable(ip.ipv4_mapped)
        if not all(_routable(v4) for v4 in _embedded_ipv4(ip)):
            return False
    return _routable(ip)


async def _resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (raises socket.gaierror when it does not resolve)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


class _Parsers:
    """``PARSERS`` link-extraction processes (:mod:`palm.data.links`, run isolated). A page's
    parse runs in one of them, off the event loop; one that is over ``budget`` seconds (or dies)
    is killed and replaced, so a hostile page costs at most one budget of one process and is
    dropped."""

    def __init__(self, budget: float):
        self.budget = budget
        self.procs: set[subprocess.Popen] = set()  # every live parser process, busy or idle
        self.closed = False
        self.idle: asyncio.Queue[subprocess.Popen] = asyncio.Queue()
        for _ in range(PARSERS):
            self.idle.put_nowait(self._start())

    def _start(self) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-I", LINKS_SCRIPT], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.procs.add(proc)
        if proc.stdout.readline() != b"ready\n":  # imported and waiting, so budgets time parsing only
            self._kill(proc)
            raise UserError(f"the crawler's link parser did not start; run `{sys.executable} -I {LINKS_SCRIPT}` "
                            f"to see why")
        return proc

    def _ask(self, proc: subprocess.Popen, body: bytes, url: str) -> tuple[subprocess.Popen, str, object]:
        """Runs in a thread: (the process to put back, "ok" | "error" | "timeout", links or why)."""
        try:
            url_bytes = url.encode("utf-8")
            proc.stdin.write(FRAME.pack(len(url_bytes), len(body)) + url_bytes + body)
            proc.stdin.flush()
            if select.select([proc.stdout], [], [], self.budget)[0]:
                reply = json.loads(proc.stdout.readline() or b'{"error": "the parser process died"}')
                if "links" in reply:
                    return proc, "ok", reply["links"]
                status, why = "error", reply["error"]
            else:
                status, why = "timeout", f"link extraction took over parse_timeout_s={self.budget} s"
        except (OSError, ValueError) as err:
            status, why = "error", f"the parser process failed ({type(err).__name__}: {err})"
        self._kill(proc)  # a process that failed once is not trusted with the next page
        return (proc if self.closed else self._start()), status, why

    def _kill(self, proc: subprocess.Popen) -> None:
        proc.kill()
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()
        self.procs.discard(proc)

    async def links(self, body: bytes, url: str) -> list[str]:
        proc = await self.idle.get()
        try:
            proc, status, value = await asyncio.to_thread(self._ask, proc, body, url)
        finally:
            self.idle.put_nowait(proc)
        if status == "ok":
            return value
        raise _Skip("parse_timeout" if status == "timeout" else "parse_error",
                    f"could not be parsed for links ({value})")

    def close(self) -> None:
        """Kill every parser (they hold no state); a thread still waiting on one then returns."""
        self.closed = True
        for proc in list(self.procs):
            self._kill(proc)


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


class _PinnedBackend(httpcore.AsyncNetworkBackend):
    """Opens every connection to the address the SSRF guard checked for its host name (``pins``)
    and refuses any host the guard has not seen. The URL keeps the name, so the HTTP client pools
    connections by origin and verifies TLS certificates (and sends SNI) for that name."""

    def __init__(self) -> None:
        self.pins: dict[str, str] = {}  # IDNA host name as in the URL -> address to connect to
        self.inner = httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None, socket_options=None) -> httpcore.AsyncNetworkStream:  # noqa: ANN001
        if host not in self.pins:
            raise httpcore.ConnectError(f"{host} was not checked by the SSRF guard")
        return await self.inner.connect_tcp(self.pins[host], port, timeout, local_address, socket_options)

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


def _decoder(content_encoding: str):  # noqa: ANN202 - a zlib decompress object or None
    """A decoder for one Content-Encoding (None: identity); stacked or unknown codings are refused,
    since each would need its own bounded decoder and none is needed to read the web."""
    coding = content_encoding.strip().lower()
    if coding in ("", "identity"):
        return None
    if coding in ("gzip", "x-gzip"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if coding == "deflate":
        return zlib.decompressobj()
    raise _Skip("encoding", f"has Content-Encoding {content_encoding!r}; only one of gzip or deflate is accepted")


class _Crawler:
    def __init__(self, cfg: CrawlConfig, client: httpx.AsyncClient, backend: _PinnedBackend, parsers: _Parsers,
                 on_page: Callable[[Page], None], url_filter: Callable[[str], bool] | None, bar: tqdm):
        self.cfg, self.client, self.backend, self.parsers = cfg, client, backend, parsers
        self.on_page, self.url_filter, self.bar = on_page, url_filter, bar
        entries = [_host_port(h) for h in cfg.allow_hosts]
        self.allow = {host for host, port in entries if port is None}  # exempt on allowed ports
        self.allow_at = {(host, port) for host, port in entries if port is not None}  # exempt on one port
        self.ports = set(STANDARD_PORTS) | set(cfg.allow_ports)
        self.scope = {host for host, _ in entries} | {urlsplit(u).hostname or "" for u in cfg.seed_urls}
        self.frontier_cap = FRONTIER_PER_PAGE * cfg.max_pages
        self.stats = CrawlStats()
        self.skipped: Counter[str] = Counter()
        self.seed_errors: dict[str, str] = {}
        self.seen: set[str] = set()
        self.queue: asyncio.Queue[tuple[str, int]] = asyncio.Queue()  # the depth being fetched
        self.next_level: list[tuple[str, int]] = []  # links found on it, fetched once it is done
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
        stopped = asyncio.create_task(self.done.wait())
        drained: asyncio.Task | None = None
        # One depth at a time: the links of depth-d pages wait in next_level until every depth-d
        # page is done, so a page's depth is its true link distance from a seed, whatever order
        # concurrent fetches finish in (otherwise a deep path that finished first could take a
        # page to max_depth and its links would be lost, differently on every run).
        while True:
            drained = asyncio.create_task(self.queue.join())
            await asyncio.wait([drained, stopped], return_when=asyncio.FIRST_COMPLETED)
            if self.done.is_set() or not self.next_level:
                break
            for item in self.next_level:
                self.queue.put_nowait(item)
            self.next_level = []
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
                    page = await self._fetch(url, depth)
                    html = _media_type(page.content_type) in HTML_TYPES
                    # Every HTML page is parsed, links needed or not: one that cannot be is dropped.
                    self._deliver(page, await self.parsers.links(page.body, page.url) if html else [])
            except _Skip as skip:
                self.skipped[skip.reason] += 1
                if depth == 0:
                    self.seed_errors.setdefault(url, str(skip))
            except Exception as err:  # a bug or an on_page failure: stop and re-raise in crawl()
                self.error = err
                self.done.set()
            finally:
                self.queue.task_done()

    def _deliver(self, page: Page, links: list[str]) -> None:
        if self.stats.fetched >= self.cfg.max_pages:
            return
        self.stats.fetched += 1
        self.on_page(page)
        self.bar.update(1)
        if self.stats.fetched >= self.cfg.max_pages:
            self.done.set()
        elif page.depth < self.cfg.max_depth:
            for link in links:
                self._enqueue(link, page.depth + 1)

    def _enqueue(self, url: str, depth: int) -> None:
        if url in self.seen:
            return
        if len(self.seen) >= self.frontier_cap:  # bounds memory against pages of endless links
            self.skipped["frontier_full"] += 1
            return
        self.seen.add(url)
        if not self._in_scope(url):
            self.skipped["out_of_scope"] += 1
        elif self.url_filter is not None and not self.url_filter(url):
            self.skipped["filtered"] += 1
        else:
            self.next_level.append((url, depth))

    def _in_scope(self, url: str) -> bool:
        return not self.cfg.same_host or (urlsplit(url).hostname or "") in self.scope

    async def _fetch(self, url: str, depth: int) -> Page:
        """One page, following redirects by hand; raises _Skip when it is not to be had."""
        chain = [url]
        while True:
            try:
                await self._guard(chain[-1])
                if self.cfg.respect_robots and not await self._robots_allow(chain[-1]):
                    trouble = self.robots_trouble.get(_origin(chain[-1]))
                    raise _Skip("robots", f"was not fetched: {trouble}" if trouble else "is disallowed by robots.txt")
                resp, location, body = await self._get(chain[-1], page=True)
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

    async def _get(self, url: str, *, page: bool) -> tuple[httpx.Response, str | None, bytes]:
        """GET one hop: (response, normalized redirect target or None, body). For pages, non-2xx
        and refused types/sizes raise _Skip; for robots.txt the caller judges the status."""
        slot = self.hosts.setdefault(_origin(url), _Host(self.cfg.concurrency, self.cfg.delay_s))
        async with slot.slots:
            resp, deadline = await self._send(url, slot)
            try:
                async with self._deadline(deadline):
                    return await self._judge(url, resp, page)
            except httpx.TransportError as err:  # the body broke off: a read timeout, a reset, bad chunking
                raise _Skip("network_error", f"broke off while sending its body ({type(err).__name__}: {err})") from None
            finally:
                await resp.aclose()

    async def _judge(self, url: str, resp: httpx.Response, page: bool) -> tuple[httpx.Response, str | None, bytes]:
        """_get's verdict on one open response, reading the body where it is wanted."""
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

    @contextlib.asynccontextmanager
    async def _deadline(self, when: float):  # noqa: ANN202
        """Cut off whatever runs inside once the request's deadline (a loop time) has passed."""
        try:
            async with asyncio.timeout_at(when):
                yield
        except TimeoutError:
            raise _Skip("deadline", f"took over request_deadline_s={self.cfg.request_deadline_s} s") from None

    async def _guard(self, url: str) -> None:
        """Check the port and the host's addresses, and pin the address the connection must go
        to (the name itself for an allow-listed host); raises _Skip."""
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
        try:
            name = httpx.URL(url).raw_host.decode("ascii")  # the host as the connection pool sees it
        except httpx.InvalidURL as err:  # stricter than urlsplit: a link like "/a&#1;b" got here
            raise _Skip("bad_url", f"is not a URL the HTTP client accepts ({err})") from None
        if port not in self.ports and (host, port) not in self.allow_at:
            raise _Skip("port", f"is refused: port {port} is not 80, 443 or in allow_ports")
        if host in self.allow or (host, port) in self.allow_at:
            self.backend.pins[name] = name
            return
        try:
            addrs = await _resolve(name, port)
        except (socket.gaierror, UnicodeError):
            raise _Skip("network_error", f"did not resolve (DNS lookup failed for {host})")
        blocked = [a for a in addrs if not is_public_address(a)]
        if blocked or not addrs:
            raise _Skip("ssrf", f"is refused: {host} resolves to non-public address "
                        f"{blocked[0] if blocked else '(none)'} and is not in allow_hosts")
        self.backend.pins[name] = addrs[0]

    async def _send(self, url: str, slot: _Host) -> tuple[httpx.Response, float]:
        """Send with retries on 429/5xx/connection errors; returns the last response, open, and
        the loop time by which its body must have been read."""
        # Only codings _read can decode in bounded steps are offered.
        headers = {"User-Agent": self.cfg.user_agent, "Accept-Encoding": "gzip, deflate"}
        loop = asyncio.get_running_loop()
        for attempt in range(self.cfg.retries + 1):
            await slot.wait_turn()
            wait = self.cfg.backoff_s * 2**attempt
            deadline = loop.time() + self.cfg.request_deadline_s
            try:
                async with self._deadline(deadline):
                    resp = await self.client.send(self.client.build_request("GET", url, headers=headers), stream=True)
            except httpx.TransportError as err:
                if attempt == self.cfg.retries:
                    raise _Skip("network_error", f"could not be fetched ({type(err).__name__}: {err})")
            else:
                if resp.status_code != 429 and resp.status_code < 500 or attempt == self.cfg.retries:
                    return resp, deadline
                retry_after = _retry_after(resp)
                wait = wait if retry_after is None else retry_after
                await resp.aclose()
            await asyncio.sleep(wait)
        raise AssertionError("unreachable")

    async def _read(self, resp: httpx.Response, limit: int) -> bytes:
        """The body, decoded here from the raw stream so that no step inflates more than
        ``limit + 1`` bytes: a compression bomb stops at the limit, not after it."""
        length = resp.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise _Skip("oversize", f"is {length} bytes, over max_bytes={limit}")
        decoder = _decoder(resp.headers.get("content-encoding", ""))
        body, received = bytearray(), 0
        async for chunk in resp.aiter_raw():
            received += len(chunk)
            while chunk and len(body) <= limit:
                if decoder is None:
                    data, chunk = chunk, b""
                else:
                    try:
                        data = decoder.decompress(chunk, limit + 1 - len(body))
                    except zlib.error as err:
                        raise _Skip("encoding", f"is not valid {resp.headers['content-encoding']} ({err})") from None
                    chunk = decoder.unconsumed_tail
                body += data
            if len(body) > limit or received > limit:  # compressed input is never allowed more
                raise _Skip("oversize", f"is over max_bytes={limit} bytes (decoded)")
        if decoder is not None and not decoder.eof:
            raise _Skip("encoding", f"is truncated {resp.headers['content-encoding']} data")
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
                await self._guard(chain[-1])
                resp, location, body = await self._get(chain[-1], page=False)
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
    bar = tqdm(total=cfg.max_pages, unit="page", desc="crawl", disable=not progress or not sys.stderr.isatty())

    async def main() -> tuple[CrawlStats, dict[str, str]]:
        backend = _PinnedBackend()
        # trust_env=False: no proxy from the environment may take the request past the SSRF guard.
        transport = httpx.AsyncHTTPTransport(trust_env=False)
        # httpx has no public hook for the network backend: give it a pool that connects to the
        # pinned addresses (same settings as its own, TLS verified against certifi's roots).
        transport._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False), max_connections=64,
            max_keepalive_connections=16, network_backend=backend)
        # A cookie policy that allows no domain: the crawler keeps no cookies, so none can leak.
        no_cookies = CookieJar(DefaultCookiePolicy(allowed_domains=[]))
        parsers = _Parsers(cfg.parse_timeout_s)
        try:
            async with httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(cfg.timeout_s),
                                         cookies=no_cookies, follow_redirects=False, trust_env=False) as client:
                crawler = _Crawler(cfg, client, backend, parsers, on_page, url_filter, bar)
                return await crawler.run(), crawler.seed_errors
        finally:
            parsers.close()

    try:
        stats, seed_errors = asyncio.run(main())
    finally:
        bar.close()
    if stats.fetched == 0:
        why = "; ".join(f"seed {url} {why}" for url, why in seed_errors.items())
        raise UserError(f"crawl fetched no page: {why or 'no seed gave a page'}; check scrape.seed_urls")
    return stats
