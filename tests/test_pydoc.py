"""The embedded default source: an isolated stdlib pydoc server that never imports strangers."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pydoc

import httpx

from palm.data.pydoc_server import allowed_module, scrub
from palm.data.scrape import PYDOC_BASE, ScrapeConfig, _collect_pydoc, pydoc_server, pydoc_url_filter


def test_allowed_modules():
    assert allowed_module("json") and allowed_module("xml.etree.ElementTree") and allowed_module("os.path")
    for name in ("test", "test.support", "ctypes.test", "unittest.test", "idlelib", "tkinter.ttk", "turtle",
                 "antigravity", "this", "lib2to3.tests", "venv.__main__", "numpy", "stray_mod", "../etc"):
        assert not allowed_module(name), name


def test_stray_module_never_imported(tmp_path, monkeypatch):
    """A module in the working directory (or on PYTHONPATH) is neither served nor imported."""
    marker = tmp_path / "IMPORTED"
    (tmp_path / "stray_mod.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    (tmp_path / "json_extra.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    with pydoc_server() as base:
        ok = pydoc_url_filter(base)
        with httpx.Client(timeout=30) as client:
            index = client.get(base).text
            assert "stray_mod" not in index and "json_extra" not in index
            assert "site-packages" not in index
            for page in ("stray_mod.html", "json_extra.html", "test.html", "antigravity.html"):
                r = client.get(base + page)
                assert "Not served" in r.text or "No Python documentation" in r.text
                assert not ok(base + page)
            assert "JSONEncoder" in client.get(base + "json.html").text
            robots = client.get(base + "robots.txt").text
            assert "Disallow: /antigravity.html" in robots and "Disallow: /test." in robots
    assert not marker.exists()


def test_server_refuses_to_run_unisolated():
    script = Path(__file__).resolve().parent.parent / "palm" / "data" / "pydoc_server.py"
    proc = subprocess.run([sys.executable, str(script)], input="", capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "-I -S" in proc.stderr


def test_only_pydocs_own_stylesheet_is_served(tmp_path):
    """pydoc joins a .css path to its folder as given: an absolute or ../ path read any file."""
    import http.client
    from urllib.parse import urlsplit

    secret = tmp_path / "secret.css"
    secret.write_text("body { color: SECRET-CONTENT }\n")
    with pydoc_server() as base:
        parts = urlsplit(base)
        index = httpx.get(base, timeout=30).text
        assert 'href="pydoc_data/_pydoc.css"' in index
        own = httpx.get(base + "pydoc_data/_pydoc.css", timeout=30)
        assert own.status_code == 200 and "{" in own.text and "SECRET" not in own.text
        depth = "../" * len(Path(pydoc.__file__).parts)  # enough ../ to climb from pydoc's folder to /
        bodies = {}
        for path in (f"/{secret}", f"//{secret}", f"/{depth}{str(secret).lstrip('/')}", "/pydoc_data/../../x.css"):
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
            conn.request("GET", path)  # sent as is: no client-side normalization of ../
            bodies[path] = conn.getresponse().read().decode()
            conn.close()
    assert not [path for path, body in bodies.items() if "SECRET-CONTENT" in body]
    assert all("not served" in body for body in bodies.values()), bodies


def test_pages_are_the_same_on_every_run_and_show_nothing_of_this_machine(monkeypatch):
    """pydoc shows reprs: memory addresses, this interpreter's paths and os.environ. Two servers
    (two processes, other addresses) serve the same pages, without the secrets of the environment
    the scrape runs in or the project's folder."""
    import re

    monkeypatch.setenv("PALM_TEST_SECRET", "s3cr3t-token-value")
    project = str(Path(__file__).resolve().parent.parent)
    pages = ("posix.html", "sys.html", "platform.html", "configparser.html", "ctypes.html", "json.html")
    runs = []
    for _ in range(2):
        with pydoc_server() as base, httpx.Client(timeout=60) as client:
            runs.append({p: client.get(base + p).text for p in pages})
    machine = [project, sys.prefix, sys.base_prefix, platform.platform(terse=True), platform.release()]
    for page in pages:
        text = runs[0][page]
        assert "s3cr3t-token-value" not in text and "PALM_TEST_SECRET" not in text, page
        assert not [m for m in machine if m in text], page  # the kernel's release: in every heading
        cut = [m.group(2) for m in re.finditer(r"""(['"])(/[^'"\s<>]*?)\.\.\.""", text)]  # pydoc's cram
        assert not [c for c in cut if len(c) > 1 and any(m.startswith(c) for m in machine[:3])], page
        assert not re.search(r"at(\s|&nbsp;)+0x(?!000000000000)[0-9a-f]{6,}", text), page
        assert runs[1][page] == text, page  # the same bytes from another process
    assert "object object at 0x000000000000" in runs[0]["configparser.html"]  # premise: it had one
    assert "/project/" in runs[0]["sys.html"] or "/venv/" in runs[0]["sys.html"]  # premise: it had paths


def test_a_path_that_pydoc_cut_short_is_replaced_too():
    """pydoc's cram keeps a long value's start and end around '...': the start of a folder alone
    is still this machine's."""
    details = [("/home/me/.pyenv/versions/3.11.7", "/venv"), ("/work/proj", "/project")]
    page = ("'/home/me/.pyenv/versions/3....dynload/_bz2.so' '/home/me/.pyenv/versions/3.11.7/lib/os.py' "
            "'/work/proj/palm/x.py' '/usr/lib/pyth...x.so' '/home/me/.py...'")
    assert scrub(page, details) == ("'/venv....dynload/_bz2.so' '/venv/lib/os.py' '/project/palm/x.py' "
                                    "'/usr/lib/pyth...x.so' '/venv...'")


def test_pages_are_recorded_under_a_fixed_base_in_page_order():
    """The server's port changes every run and fetches finish in any order; records are written
    under PYDOC_BASE (the URL also picks the WARC shard) sorted by it, so the corpus order is
    the same on every run."""
    class Records:
        def __init__(self):
            self.urls: list[str] = []

        def write(self, rec):
            self.urls.append(rec.url)

    out = Records()
    _collect_pydoc(ScrapeConfig(max_pages=25, max_depth=1, concurrency=4), out, progress=False)
    assert 20 <= len(out.urls) <= 24  # "/" and "index.html", the index, are fetched but not kept
    assert all(u.startswith(PYDOC_BASE) and u.endswith(".html") for u in out.urls), out.urls[:3]
    assert out.urls == sorted(out.urls)
