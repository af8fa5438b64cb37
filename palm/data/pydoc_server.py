"""Serve the Python standard library's documentation over HTTP, safely enough to crawl.

This file is run as a separate, isolated interpreter (``python -I -S pydoc_server.py``): no
working directory, no user site and no site-packages on ``sys.path``, so pydoc can only find the
standard library. It must import nothing but the standard library.

Serving a pydoc page imports its module and runs its top-level code, so three layers keep the
crawl to harmless standard-library pages (README, "The embedded default data"):
- ``sys.path`` holds only the standard library (the interpreter flags above);
- ``robots.txt`` disallows the excluded modules, which a polite crawler honours;
- the handler itself refuses any page whose module is not an allowed standard-library one.

Protocol: prints ``URL <base-url>`` on one line to stdout, then serves until stdin closes or the
process is terminated. Output that imported modules print goes to stderr, never to the pipe.

Pages are made the same on every run and free of this machine's details (:func:`scrub`): pydoc
renders default values and module data with ``repr``, so a page shows memory addresses
(``<object object at 0x7f...>``, which change with every process), this interpreter's paths
(``sys.executable``, ``sys.argv``, defaults captured at import) and, in ``os.environ``'s dump
(the ``posix``, ``cgi``, ``wsgiref.handlers`` pages), the process environment; every page's
heading names the platform, kernel release included. The parent starts this server with a
near-empty environment (no tokens or passwords in a page), and :func:`scrub` replaces addresses,
paths and the platform with fixed stand-ins, so two runs of the default scrape give the same
texts, hence the same corpus, splits and models (before the platform was replaced, every page
carried the kernel release of the machine that served it).
"""

import re
import sys

# Checked before anything else is imported: run without -I, this file's folder would be on
# sys.path and its neighbours (e.g. palm/data/tokenize.py) would shadow standard modules.
if __name__ == "__main__" and not (sys.flags.isolated and sys.flags.no_site):
    raise SystemExit("pydoc_server.py must run with -I -S (isolated, no site-packages)")

import pydoc  # noqa: E402

# Top-level modules never served: they open windows or browsers, print, or start test suites.
EXCLUDED_TOP = frozenset({
    "test", "__main__", "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo",
    "__hello__", "__phello__", "pydoc", "ensurepip", "lib2to3",
})
# Any dotted component with one of these names excludes the module (``*.tests``, ``idle_test``…).
EXCLUDED_PART = frozenset({"test", "tests", "idle_test", "__main__"})
# The stylesheet pydoc's pages link to (relative to pydoc's folder); no other .css is served.
STYLESHEET = "pydoc_data/_pydoc.css"


def allowed_module(name):
    """True for a dotted name inside an allowed standard-library module."""
    parts = name.split(".")
    if not all(p.isidentifier() for p in parts):
        return False
    top = parts[0]
    return (top in sys.stdlib_module_names and top not in EXCLUDED_TOP
            and not any(p in EXCLUDED_PART for p in parts))


def robots_txt():
    lines = ["User-agent: *", "Disallow: /search", "Disallow: /getfile", "Disallow: /get?"]
    lines += [f"Disallow: /{name}." for name in sorted(EXCLUDED_TOP)]
    lines += [f"Disallow: /{name}.html" for name in sorted(EXCLUDED_TOP)]
    return "\n".join(lines) + "\n"


# "at 0x7f15...>" (objects, functions; "&nbsp;" in signatures) and ctypes' "handle 7f15...>"
_ADDRESS = re.compile(r"((?:\bat|&nbsp;at)(?:\s|&nbsp;)+0x|\bhandle(?:\s|&nbsp;)+)[0-9a-f]{6,16}\b")


def scrub(page, details):
    """``page`` with memory addresses replaced by a fixed one and each ``(text, stand-in)`` of
    ``details`` (the longest first) by its stand-in. A path that pydoc cut short (its ``cram``
    keeps a long value's start and end around ``...``, so ``'/home/me/.pyenv/versions/3....so'``
    shows only the start of a folder) counts too: a quoted start of one of the paths right
    before ``...`` becomes the path's stand-in."""
    page = _ADDRESS.sub(lambda m: m.group(1) + ("0" * 12), page)
    details = [(text, stand_in) for text, stand_in in sorted(details, key=lambda d: -len(d[0]))
               if text and text != "/"]
    for text, stand_in in details:
        page = page.replace(text, stand_in)

    def cut(m):
        start = m.group(2)
        for text, stand_in in details:
            if len(start) > 1 and text.startswith("/") and text.startswith(start):
                return m.group(1) + stand_in + "..."
        return m.group(0)

    return _CUT_PATH.sub(cut, page)


# a quoted absolute path that pydoc's cram cut short: "'/home/me/.pyenv/versions/3...."
_CUT_PATH = re.compile(r"""(['"])(/[^'"\s<>]*?)\.\.\.""")


def machine_details():
    """What pages would show of this machine, with the stand-ins they show instead: this
    interpreter's and this project's folders, and the platform in every page's heading (the
    kernel's release: ``Linux-6.18.44-fc-v1252-x86_64-with-glibc2.36`` on one machine, another
    on the next, which would change every document of the corpus)."""
    import html
    import platform
    from pathlib import Path

    project = str(Path(__file__).resolve().parents[2])
    return [(sys.prefix, "/venv"), (sys.exec_prefix, "/venv"), (sys.base_prefix, "/python"),
            (sys.base_exec_prefix, "/python"), (project, "/project"),
            (html.escape(platform.platform(terse=True)), platform.system())]


def make_handler(pydoc_handler):
    details = machine_details()

    def handler(url, content_type="text/html"):
        path = url.lstrip("/")
        if path == "robots.txt":
            return robots_txt()
        if content_type == "text/css":
            # pydoc opens any path ending in .css (joined as given, so absolute or ../ paths
            # escape): only its own stylesheet, the one its pages link to, is served.
            return pydoc_handler(url, content_type) if path == STYLESHEET else "/* not served */\n"
        if path in ("", "index.html"):
            return pydoc_handler(url, content_type)
        if path.endswith(".html") and allowed_module(path[: -len(".html")]):
            return scrub(pydoc_handler(url, content_type), details)
        return ("<!DOCTYPE html><html><head><title>Refused</title></head><body>"
                "<p>Not served: only allowed standard-library module pages are.</p></body></html>")
    return handler


def main():
    thread = pydoc._start_server(make_handler(pydoc._url_handler), "127.0.0.1", 0)
    if thread.error:
        raise SystemExit(f"pydoc server failed to start: {thread.error}")
    out = sys.stdout
    print(f"URL {thread.url}", file=out, flush=True)
    sys.stdout = sys.stderr  # modules imported while serving must not write into our pipe
    try:
        sys.stdin.read()  # returns when the parent closes stdin (or exits)
    finally:
        thread.stop()


if __name__ == "__main__":
    main()
