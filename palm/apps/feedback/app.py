"""``palm feedback serve``: the ranking page, a small Flask app on 127.0.0.1.

The page (``templates/index.html`` with ``static/feedback.js``) shows one item of a batch at a time
and the labeler orders its replies best to worst (drag, or keys 1..K), or marks them all bad, or
skips; it can go back to any item and judge it again. It talks to three JSON endpoints:

* ``GET /api/state``: the batch, the labeler, how many items they judged, the first one they have
  not (where a restarted session resumes), the agreement between the batch's labelers;
* ``GET /api/item/<i>``: item ``i`` (prompt, replies) and the labeler's latest judgement of it;
* ``POST /api/judge``: a judgement, appended to the rankings file and synced to disk before the
  answer says it is saved (the page moves on only then).

Model output is data, never markup: the page puts every prompt and reply into the document with
``textContent`` (and the Content-Security-Policy allows no inline script at all).

Safety. The server binds 127.0.0.1 unless told otherwise. It answers only those who hold the
session's key: the address it prints carries it (``http://127.0.0.1:PORT/?key=…``); opening it
sets an HttpOnly, SameSite=Strict cookie and drops the key from the address bar, and every
request, the page and its static files included, needs that cookie (or the key) or gets 403, so
another user of the machine, who can reach the port but not read the terminal, gets nothing. It
answers only requests addressed to it by one of its own names (``Host``: 127.0.0.1, localhost or
the ``--host`` given, with its port), so a DNS-rebinding page cannot read it. A judgement also
needs the per-session token that the page carries (a page of another site cannot read it), a
JSON body whose numbers are numbers (``true`` is no index), and at most :data:`MAX_BODY` bytes.
"""

from __future__ import annotations

import ipaddress
import secrets
import socket
import time
from pathlib import Path
from typing import Any

from palm.apps.feedback.store import RankingsFile, batch_agreement, read_batch
from palm.data import rankings

MAX_BODY = 64 * 1024  # bytes of a request body (a judgement is a few hundred)
TOKEN_HEADER = "X-Feedback-Token"
KEY_PARAM = "key"  # the query parameter of the printed address that carries the session's key
COOKIE = "palm_feedback"  # the key's cookie; served, its name ends in the port (cookies ignore ports)
LOCAL_NAMES = ("127.0.0.1", "localhost", "[::1]")  # Host names always answered (with the port, once served)
SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                                "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server on this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _same(given: Any, secret: str) -> bool:
    return isinstance(given, str) and secrets.compare_digest(given.encode(), secret.encode())


def guarded_app(command: str, key: str | None = None, **config: Any) -> Any:
    """A Flask app (this package's templates and static files) that applies the rules of the
    module docstring to every request: the session's ``key`` (default: a new random one) by
    cookie or ``?key=`` (``command`` names what printed the address), a ``Host`` among
    ``app.config["ALLOWED_HOSTS"]``, the security headers, JSON errors. ``config`` joins
    ``app.config``."""
    from flask import Flask, abort, jsonify, redirect, request

    key = key or secrets.token_urlsafe(32)
    app = Flask(__name__)
    app.config.update(MAX_CONTENT_LENGTH=MAX_BODY, ALLOWED_HOSTS=set(LOCAL_NAMES), KEY=key, COOKIE=COOKIE, **config)

    @app.before_request
    def addressed_to_us_by_a_key_holder():
        allowed = app.config["ALLOWED_HOSTS"]
        if request.host not in allowed:
            abort(403, f"this server answers requests to {', '.join(sorted(allowed))} only")
        given = request.args.get(KEY_PARAM)
        if not (_same(given, key) or _same(request.cookies.get(app.config["COOKIE"]), key)):
            abort(403, f"open the address {command} printed: it carries this session's key")
        if given is not None and request.method == "GET" and request.endpoint == "page":
            # the key becomes a cookie that scripts cannot read and other sites' requests do not
            # carry, and leaves the address bar (and the browser's history)
            resp = redirect("/", 303)
            resp.set_cookie(app.config["COOKIE"], key, httponly=True, samesite="Strict", path="/")
            return resp
        return None

    @app.after_request
    def headers(resp):
        resp.headers.update(SECURITY_HEADERS)
        return resp

    @app.errorhandler(400)
    @app.errorhandler(403)
    @app.errorhandler(404)
    @app.errorhandler(405)
    @app.errorhandler(413)
    def error(err):
        return jsonify(error=getattr(err, "description", str(err))), err.code

    return app


def judgement_body(token: str, fields: str) -> dict:
    """A judgement's JSON object, after checking the page's token (403) and that it is an object
    (400, naming ``fields``)."""
    from flask import abort, request

    if not _same(request.headers.get(TOKEN_HEADER), token):
        abort(403, f"missing or wrong {TOKEN_HEADER}: judgements come from the page this server served")
    try:
        body = request.get_json(silent=True) if request.is_json else None
    except RecursionError:  # nested deeper than the JSON parser goes
        body = None
    if not isinstance(body, dict):
        abort(400, f"expected a JSON object: {fields}")
    return body


def create_app(batch_path: Path, rankings_path: Path, labeler: str, token: str | None = None,
               key: str | None = None) -> Any:
    """The Flask app for one labeler and one batch. ``key``: the session's key (default: a new
    random one), which every request must carry (cookie or ``?key=``); ``token``: the page's
    token a judgement must carry (default: a new random one). ``app.config["ALLOWED_HOSTS"]``:
    the ``Host`` headers answered (the local names; :func:`serve` adds the port and the
    configured host once the port is known)."""
    from flask import abort, jsonify, render_template

    items = read_batch(batch_path)
    batch = items[0]["batch"]
    store = RankingsFile(rankings_path)
    token = token or secrets.token_urlsafe(32)
    app = guarded_app("palm feedback serve", key, TOKEN=token)

    def mine() -> dict[str, dict]:
        return {item: r for (item, who), r in store.latest(batch).items() if who == labeler}

    def first_open(judged: dict[str, dict]) -> int:
        return next((i for i, it in enumerate(items) if it["item"] not in judged), len(items))

    @app.get("/")
    def page():
        return render_template("index.html", token=token, labeler=labeler, batch=batch)

    @app.get("/api/state")
    def state():
        judged = mine()
        latest = store.latest(batch)
        return jsonify(batch=batch, labeler=labeler, total=len(items), judged=len(judged), next=first_open(judged),
                       agreement=batch_agreement(latest, batch))

    @app.get("/api/item/<int:index>")
    def item(index: int):
        if not 0 <= index < len(items):
            abort(404, f"no item {index} (the batch has {len(items)})")
        it = items[index]
        return jsonify(index=index, total=len(items), item=it["item"], prompt=it["prompt"], replies=it["replies"],
                       judgement=mine().get(it["item"]))

    @app.post("/api/judge")
    def judge():
        body = judgement_body(token, "index, item, verdict, order")
        index = body.get("index")
        if not (isinstance(index, int) and not isinstance(index, bool) and 0 <= index < len(items)) \
                or body.get("item") != items[index]["item"]:
            abort(400, "index and item do not name an item of this batch")
        it = items[index]
        try:
            rankings.places(body.get("verdict"), body.get("order"), len(it["replies"]))
        except ValueError as err:
            abort(400, str(err))
        record = {"format": rankings.FORMAT, "batch": batch, "item": it["item"], "index": index,
                  "prompt": it["prompt"], "replies": it["replies"], "verdict": body["verdict"],
                  "order": body.get("order"), "labeler": labeler,
                  "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "model": it.get("model"), "sampling": it.get("sampling")}
        store.append(record)  # on disk (fsync) before the page hears it is saved
        judged = mine()
        return jsonify(saved=True, judged=len(judged), next=first_open(judged), total=len(items))

    return app


def allowed_hosts(host: str, port: int) -> set[str]:
    """The ``Host`` headers a server bound to ``host``:``port`` answers: the loopback names and
    ``host``; bound to every interface (0.0.0.0, ::), also this machine's names and addresses."""
    names = {*LOCAL_NAMES, f"[{host}]" if ":" in host else host}
    if host in ("0.0.0.0", "::", ""):
        try:
            hostname = socket.gethostname()
            names |= {hostname, socket.getfqdn()}
            names |= {f"[{a[4][0]}]" if a[0] == socket.AF_INET6 else a[4][0]
                      for a in socket.getaddrinfo(hostname, None, proto=socket.IPPROTO_TCP)}
        except OSError:
            pass
    return {f"{name}:{port}" for name in names if name}


def run_page(app: Any, host: str, port: int, announce, what: str) -> int:
    """:func:`serve` as a command does: a warning line off loopback (``what``: what strangers could
    submit), a one-line error when the port is taken, a quiet stop on Ctrl-C; the exit code."""
    import sys

    from palm.core.errors import UserError

    if not is_loopback(host):
        print(f"palm feedback: warning: serving on {host}: anyone who can reach it and has the printed "
              f"address (with its key, sent unencrypted) can submit {what}", file=sys.stderr)
    try:
        serve(app, host, port, announce)
    except OSError as err:
        raise UserError(f"cannot listen on {host}:{port} ({err.strerror or err}); "
                        "pass another --port (0: any free one)") from None
    except KeyboardInterrupt:
        print("palm feedback: stopped", file=sys.stderr)
    return 0


def serve(app: Any, host: str, port: int, announce) -> None:
    """Serve ``app`` (Werkzeug's threaded server) until interrupted; ``announce(url)`` once bound,
    with the address that carries the session's key."""
    import logging

    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    server = make_server(host, port, app, threaded=True)
    bound = server.server_port
    app.config["ALLOWED_HOSTS"] = allowed_hosts(host, bound)
    app.config["COOKIE"] = f"{COOKIE}_{bound}"  # another session on another port keeps its own
    url_host = f"[{host}]" if ":" in host else host
    announce(f"http://{url_host}:{bound}/?{KEY_PARAM}={app.config['KEY']}")
    try:
        server.serve_forever()
    finally:
        server.server_close()
