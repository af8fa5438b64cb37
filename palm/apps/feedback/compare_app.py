"""``palm feedback compare``: the blind A/B page, a small Flask app on 127.0.0.1.

The page (``templates/compare.html`` with ``static/compare.js``) shows one prompt and two replies,
left and right, and the labeler says which is better: left, right, a tie, or both bad (keys 1, 2,
t, b; ←/→ go back and forward, and judging an item again replaces the judgement). Which model
wrote which reply is the server's secret: the page and its JSON carry neither the models' names,
paths nor hashes, only "left" and "right"; the server maps the choice back to A/B with the side
the comparison file drew for the item. Endpoints:

* ``GET /api/state``: the labeler, how many items they judged, the first one they have not;
* ``GET /api/item/<i>``: item ``i`` (prompt, left and right reply) and the labeler's choice, if any;
* ``POST /api/judge``: ``{index, choice}``, appended to the judgments file and synced to disk
  before the answer says it is saved.

Safety: the rules of the ranking page (:mod:`palm.apps.feedback.app`): the session's key (printed
address, then an HttpOnly SameSite=Strict cookie) on every request, the ``Host`` header one of the
server's own names, the page's token on a judgement, a JSON body of at most ``MAX_BODY`` bytes,
no inline script, model output put into the page as text.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from palm.apps.feedback.app import guarded_app, judgement_body
from palm.apps.feedback.judgments import JudgmentsFile
from palm.eval.human import FORMAT

DISPLAY = ("left", "right", "tie", "both_bad")  # what the page sends


def stored_choice(shown: str, a_side: str) -> str:
    """The choice in A/B terms of the choice the page showed (``left``, ``right``, ``tie``, ``both_bad``)."""
    if shown in ("left", "right"):
        return "a" if shown == a_side else "b"
    return shown


def shown_choice(stored: str, a_side: str) -> str:
    """The inverse of :func:`stored_choice`."""
    if stored in ("a", "b"):
        return a_side if stored == "a" else ("right" if a_side == "left" else "left")
    return stored


def create_compare_app(items: list[dict[str, Any]], judgments: JudgmentsFile, labeler: str,
                       models: dict[str, dict] | None = None, token: str | None = None,
                       key: str | None = None) -> Any:
    """The Flask app for one labeler and one comparison's ``items`` (:mod:`.comparison`).
    ``models``: the identities ``{"a", "b"}`` recorded with each judgement (default: the items');
    ``token``, ``key`` and ``app.config["ALLOWED_HOSTS"]`` as in :func:`palm.apps.feedback.app.create_app`
    (:func:`palm.apps.feedback.app.serve` serves it)."""
    from flask import abort, jsonify, render_template

    comparison = items[0]["comparison"]
    models = models or {"a": items[0]["model_a"], "b": items[0]["model_b"]}
    token = token or secrets.token_urlsafe(32)
    app = guarded_app("palm feedback compare", key, TOKEN=token, COMPARISON=comparison)

    def progress() -> dict[str, int]:
        judged = judgments.mine(comparison, labeler)
        first = next((i for i in range(len(items)) if i not in judged), len(items))
        return {"total": len(items), "judged": len(judged), "next": first}

    @app.get("/")
    def page():
        return render_template("compare.html", token=token, labeler=labeler)

    @app.get("/api/state")
    def state():
        return jsonify(labeler=labeler, **progress())

    @app.get("/api/item/<int:index>")
    def item(index: int):
        if not 0 <= index < len(items):
            abort(404, f"no item {index} (the comparison has {len(items)})")
        it = items[index]
        left, right = ("a", "b") if it["a_side"] == "left" else ("b", "a")
        mine = judgments.mine(comparison, labeler).get(index)
        return jsonify(index=index, total=len(items), prompt=it["prompt"], left=it["replies"][left],
                       right=it["replies"][right], judgement=mine and shown_choice(mine["choice"], it["a_side"]))

    @app.post("/api/judge")
    def judge():
        body = judgement_body(token, "index, choice")
        index, shown = body.get("index"), body.get("choice")
        if not (isinstance(index, int) and not isinstance(index, bool) and 0 <= index < len(items)):
            abort(400, f"index: not an item of this comparison (0 to {len(items) - 1})")
        if shown not in DISPLAY:
            abort(400, f"choice: one of {', '.join(DISPLAY)}")
        it = items[index]
        judgments.append({"format": FORMAT, "comparison": comparison, "index": index, "prompt": it["prompt"],
                          "model_a": models["a"], "model_b": models["b"], "replies": it["replies"],
                          "choice": stored_choice(shown, it["a_side"]), "a_side": it["a_side"],
                          "labeler": labeler, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                          "sampling": it["sampling"]})  # on disk (fsync) before the page hears it is saved
        return jsonify(saved=True, **progress())

    return app
