"""``palm serve MODEL``: an OpenAI-compatible HTTP server over an exported model (FastAPI + uvicorn,
127.0.0.1 by default). Any OpenAI client talks to it (docs/openai-server.md):

* ``GET /v1/models``: the one model served, by the name ``--name`` (default: ``MODEL`` as given);
* ``POST /v1/chat/completions``: ``messages`` (roles system, user, assistant) rendered with the
  chat template of ``palm chat`` (:class:`palm.data.chat.ChatTemplate`), the reply generated after
  ``<|assistant|>``; ``max_tokens``, ``temperature`` (0: greedy), ``top_p``, ``stream`` (server-sent
  events in OpenAI's chunk format, ending with ``data: [DONE]``);
* ``POST /v1/completions``: a plain continuation of ``prompt`` (its tokens, no template);
* ``GET /v1/palm/stats``: decoding steps so far, by how many requests each advanced, and the
  passes of joining prompts; ``GET /health``.

Batching (continuous): one worker thread owns the model and a :class:`palm.decode.batcher.Batcher`;
HTTP handlers queue their requests to it. Between two decoding steps the worker hands every queued
request to the batcher, which joins them to the running batch (up to ``--max-batch`` rows: their
prompts in one pass, then one token per row per step) and drops each row as it ends (its stop
token or its own ``max_tokens``), so no request waits for a longer one; a request arriving at a
busy batch may wait up to ``--gather-steps`` steps for others to join with it in one prompt pass
(a pass costs a few steps' worth of fixed costs). Requests with other
sampling settings or stop tokens share the steps. When idle, the worker first waits
``--batch-window-ms`` after a request for others. ``--batching static`` admits requests only to
an empty batch (the batch runs until its last row ends), for comparison. Each row's text is handed
out as it is made (:class:`palm.apps.chat.StreamDecoder`: whole characters only).

Limits, refused with OpenAI's error object ``{"error": {"message", "type", "param", "code"}}``:
the request body (``--max-body-bytes``, 413), ``max_tokens`` (``--max-tokens-cap``, 400), the
number of messages (``--max-messages``, 400), the prompt (at most ``seq_len - max_tokens`` tokens,
400), an unknown model name (404), a malformed request (400; wrong JSON types 422).
"""

# no `from __future__ import annotations`: FastAPI reads the handlers' annotations (``Request``,
# imported inside make_app) as objects, which string annotations would hide from it
import argparse
import dataclasses
import json
import queue
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from palm.apps.chat import CHAT_KINDS, QUANTIZE, StreamDecoder
from palm.apps.messages import BadMessages, chat_turns
from palm.core.errors import UserError

# torch, the model and FastAPI are imported where they are used (palm's other commands import
# this module to list its flags)



class ApiError(Exception):
    """A refused request: its HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclasses.dataclass(eq=False)
class Job:
    """One request queued to the decoding worker; ``emit`` is called (from the worker thread) with
    ``("text", piece)``, then ``("end", finish_reason, completion_tokens)`` or ``("error", message)``."""

    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float | None
    stop_ids: tuple[int, ...]
    emit: Callable[[tuple], None]
    stream: bool = True  # text handed out as it is made; else all of it at the end
    made: int = 0  # completion tokens so far (the worker's)
    text: Any = None  # its StreamDecoder (the worker's)


class Engine:
    """The model, its tokenizer and the decoding worker thread (see the module docstring)."""

    def __init__(self, model: Any, tokenizer: Any, kind: str, *, max_batch: int = 16, seed: int = 0,
                 window_s: float = 0.0, weights: Any = None, continuous: bool = True, gather_steps: int = 0):
        import torch

        from palm.core.tokenizer import special_ids
        from palm.data.chat import ChatTemplate
        from palm.decode.batcher import Batcher

        self.model, self.tokenizer, self.kind, self.max_batch = model, tokenizer, kind, max_batch
        self.window_s = window_s  # an idle worker waits this long after a request for others to join it
        self.seq_len = model.cfg.seq_len
        self.ids = special_ids(tokenizer)
        self.template = ChatTemplate(tokenizer)
        generator = torch.Generator(model.embedding.weight.device).manual_seed(seed)
        # weights: int8 weights of the model to decode with (palm.decode.quant), or None
        self.batcher = Batcher(model, max_batch, weights=weights, generator=generator, pad_id=self.ids["pad_id"],
                               continuous=continuous, gather_steps=gather_steps)
        self.jobs: queue.Queue[Job] = queue.Queue()  # from the HTTP handlers
        self.rows: dict[int, int] = {}  # live rows of a step -> how many steps decoded that many
        self.worker = threading.Thread(target=self._work, name="palm-decoder", daemon=True)
        self.worker.start()

    # --- prompts ---------------------------------------------------------------------------
    def chat_ids(self, messages: list[tuple[str, str]]) -> list[int]:
        from palm.data.chat_readers import Turn

        return self.template.render_prompt(tuple(Turn(role, text) for role, text in messages))

    def text_ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids or [self.ids["eod_id"]]

    def stop_ids(self, chat: bool) -> tuple[int, ...]:
        """A chat reply ends at the end of its turn; a continuation (and a pretrain model) at end of document."""
        return (self.ids["end_turn_id"], self.ids["eod_id"]) if chat and self.kind != "pretrain" else (self.ids["eod_id"],)

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def stats(self) -> dict:
        return {"steps": sum(self.rows.values()), "rows_per_step": {str(n): c for n, c in sorted(self.rows.items())},
                "prompt_passes": self.batcher.prompt_passes,
                "queued": self.jobs.qsize() + len(self.batcher.pending)}

    # --- the worker ------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def _take(self) -> None:
        """Hand every queued job to the batcher; when it is idle, first wait for one (and then
        ``window_s`` for others to join it)."""
        if self.batcher.idle:
            self._add(self.jobs.get())
            deadline = time.monotonic() + self.window_s  # let a burst of requests gather
            while (left := deadline - time.monotonic()) > 0:
                try:
                    self._add(self.jobs.get(timeout=left))
                except queue.Empty:
                    break
        while True:
            try:
                self._add(self.jobs.get_nowait())
            except queue.Empty:
                break

    def _add(self, job: Job) -> None:
        from palm.decode.batcher import Request
        from palm.decode.generate import SamplingConfig

        job.text = StreamDecoder(self.tokenizer)
        try:
            self.batcher.add(Request(job.prompt, job.max_tokens, SamplingConfig(job.temperature, None, job.top_p),
                                     frozenset(job.stop_ids), tag=job))
        except UserError as err:
            job.emit(("error", str(err)))

    def _work(self) -> None:
        while True:
            self._take()
            try:
                events = self.batcher.step()
            except Exception as err:  # noqa: BLE001 - every request in the batch hears of it, the worker lives on
                for request in self.batcher.reset():
                    request.tag.emit(("error", f"{type(err).__name__}: {err}"))
                continue
            n = len({id(e.request) for e in events})
            if n:
                self.rows[n] = self.rows.get(n, 0) + 1
            for e in events:
                job = e.request.tag
                if e.end == "stop":  # the end of turn: no text, not counted
                    self._finish(job, "stop")
                    continue
                job.made += 1
                if job.stream:
                    piece = job.text.feed(e.token)
                    if piece:
                        job.emit(("text", piece))
                else:  # decoded once at the end: no text per token to make, nor to wake the handler for
                    job.text.ids.append(e.token)
                if e.end == "length":
                    self._finish(job, "length")

    @staticmethod
    def _finish(job: Job, reason: str) -> None:
        rest = job.text.finish()
        if rest:
            job.emit(("text", rest))
        job.emit(("end", reason, job.made))


# --- requests ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Limits:
    max_tokens: int  # the largest max_tokens a request may ask for (also its default)
    max_messages: int
    max_body_bytes: int


def _number(body: dict, key: str, default: float, low: float, high: float) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(422, f"{key} must be a number, got {type(value).__name__}", key, "invalid_type")
    if not low <= value <= high:
        raise ApiError(400, f"{key} must be between {low:g} and {high:g}, got {value}", key, "invalid_value")
    return float(value)


def parse(body: dict, engine: Engine, limits: Limits, name: str, chat: bool) -> tuple[Job | None, dict]:
    """Check a request body against the limits; the job to queue (its ``emit`` still to set) and
    the request's options (``stream``, ``n_prompt``)."""
    model = body.get("model")
    if model != name:
        raise ApiError(404, f"The model `{model}` does not exist: this server serves `{name}`", "model",
                       "model_not_found")
    if body.get("n", 1) != 1:
        raise ApiError(400, "n must be 1", "n", "invalid_value")
    raw = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = limits.max_tokens if raw is None else raw
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise ApiError(422, f"max_tokens must be an integer, got {type(max_tokens).__name__}", "max_tokens",
                       "invalid_type")
    if not 1 <= max_tokens <= limits.max_tokens:
        raise ApiError(400, f"max_tokens must be between 1 and {limits.max_tokens} (this server's cap), "
                            f"got {max_tokens}", "max_tokens", "invalid_value")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p <= 0:
        raise ApiError(400, "top_p must be > 0", "top_p", "invalid_value")
    if chat:
        try:
            turns = chat_turns(body.get("messages"), limits.max_messages)
        except BadMessages as err:
            raise ApiError(400, str(err), err.param, err.code) from None
        prompt = engine.chat_ids(turns)
    else:
        text = body.get("prompt")
        if isinstance(text, list) and len(text) == 1 and isinstance(text[0], str):
            text = text[0]
        if not isinstance(text, str):
            raise ApiError(400, "prompt must be a string (one prompt per request)", "prompt", "invalid_value")
        prompt = engine.text_ids(text)
    room = engine.seq_len - max_tokens
    if len(prompt) > room:
        raise ApiError(400, f"the prompt is {len(prompt)} tokens; with max_tokens {max_tokens} at most {room} fit "
                            f"the model's {engine.seq_len}-token context", "messages" if chat else "prompt",
                       "context_length_exceeded")
    job = Job(prompt, max_tokens, temperature, top_p if top_p < 1 else None, engine.stop_ids(chat), emit=lambda e: None)
    return job, {"stream": bool(body.get("stream", False)), "n_prompt": len(prompt),
                 "usage": bool((body.get("stream_options") or {}).get("include_usage"))}


# --- the app ----------------------------------------------------------------------------------

def make_app(engine: Engine, name: str, limits: Limits):
    import asyncio

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="palm serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def refused(request: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(404)
    async def not_found(request: Request, err: Exception) -> JSONResponse:
        return JSONResponse(ApiError(404, f"no such path: {request.url.path}", code="not_found").body(), 404)

    async def read(request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise ApiError(413, f"the request body is {declared} bytes; at most {limits.max_body_bytes} "
                                "(--max-body-bytes)", code="request_too_large")
        data = b""
        async for chunk in request.stream():  # a body without (or lying about) its length is counted as read
            data += chunk
            if len(data) > limits.max_body_bytes:
                raise ApiError(413, f"the request body is over {limits.max_body_bytes} bytes (--max-body-bytes)",
                               code="request_too_large")
        try:
            body = json.loads(data)
        except ValueError as err:
            raise ApiError(400, f"the body is not JSON: {err}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object", code="invalid_json")
        return body

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    card = {"id": name, "object": "model", "created": int(time.time()), "owned_by": "palm"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        if model_id != name:
            raise ApiError(404, f"The model `{model_id}` does not exist", "model", "model_not_found")
        return card

    @app.get("/v1/palm/stats")
    async def stats() -> dict:
        return engine.stats()

    async def complete(request: Request, chat: bool):
        body = await read(request)
        job, opts = parse(body, engine, limits, name, chat)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job.emit = lambda e: loop.call_soon_threadsafe(events.put_nowait, e)
        job.stream = opts["stream"]
        engine.submit(job)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        base = {"id": rid, "created": int(time.time()), "model": name}

        def usage(made: int) -> dict:
            return {"prompt_tokens": opts["n_prompt"], "completion_tokens": made,
                    "total_tokens": opts["n_prompt"] + made}

        if not opts["stream"]:
            parts = []
            while True:
                event = await events.get()
                if event[0] == "text":
                    parts.append(event[1])
                elif event[0] == "error":
                    raise ApiError(500, event[1], type_="server_error", code="generation_failed")
                else:
                    break
            text, reason, made = "".join(parts), event[1], event[2]
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                       "logprobs": None} if chat else
                      {"index": 0, "text": text, "finish_reason": reason, "logprobs": None})
            return {**base, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
                    "usage": usage(made)}

        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, reason: str | None = None, role: bool = False) -> str:
            if chat:
                d = {"role": "assistant", "content": ""} if role else ({"content": delta} if delta is not None else {})
                choice = {"index": 0, "delta": d, "finish_reason": reason, "logprobs": None}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": reason, "logprobs": None}
            return f"data: {json.dumps({**base, 'object': kind, 'choices': [choice]})}\n\n"

        async def stream():
            if chat:
                yield chunk(None, role=True)
            while True:
                event = await events.get()
                if event[0] == "text":
                    yield chunk(event[1])
                elif event[0] == "error":
                    err = ApiError(500, event[1], type_="server_error", code="generation_failed")
                    yield f"data: {json.dumps(err.body())}\n\n"
                    break
                else:
                    yield chunk(None, event[1])
                    if opts["usage"]:
                        yield f"data: {json.dumps({**base, 'object': kind, 'choices': [], 'usage': usage(event[2])})}\n\n"
                    break
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    return app


# --- the command line (palm/apps/cli.py registers it) -------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="an exported model folder (e.g. models/ppo) or a registry URI "
                                                 "(e.g. models:/palm-chat@champion)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default %(default)s)")
    p.add_argument("--name", default=None, help="the model's name in the API (default: MODEL as given)")
    p.add_argument("--max-tokens-cap", type=int, default=256,
                   help="largest max_tokens a request may ask (default %(default)s, at most the context - 1)")
    p.add_argument("--max-messages", type=int, default=64, help="most messages per chat request (default %(default)s)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default %(default)s)")
    p.add_argument("--max-batch", type=int, default=16, help="most requests decoded together (default %(default)s)")
    p.add_argument("--batch-window-ms", type=float, default=0.0,
                   help="an idle worker waits this long after a request for others to join it at once "
                        "(default %(default)s)")
    p.add_argument("--batching", choices=("continuous", "static"), default="continuous",
                   help="continuous: requests join the running batch at the next step (default); static: "
                        "only an empty one, so a batch runs until its longest reply ends (for comparison)")
    p.add_argument("--gather-steps", type=int, default=4,
                   help="continuous: a request arriving at a busy batch may wait up to this many steps for "
                        "others, to join with them in one prompt pass (default %(default)s; 0: never waits)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default %(default)s)")
    p.add_argument("--quantize", choices=QUANTIZE, default="none",
                   help="int8: decode from int8 weights, faster on CPU, replies a little different (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    from palm.model.export import load_model, load_tokenizer, read_export
    from palm.model.parallel import process_groups

    for flag in ("max_tokens_cap", "max_messages", "max_body_bytes", "max_batch"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')}: must be >= 1, got {getattr(args, flag)}")
    export = read_export(args.model, kinds=CHAT_KINDS)
    tokenizer = load_tokenizer(export)
    seq_len = export.model.seq_len
    limits = Limits(min(args.max_tokens_cap, seq_len - 1), args.max_messages, args.max_body_bytes)
    name = args.name or args.model
    import uvicorn

    with process_groups():
        from palm.decode.quant import quantize

        model = load_model(export).requires_grad_(False)  # for decoding only
        engine = Engine(model, tokenizer, export.kind, max_batch=args.max_batch, seed=args.seed,
                        window_s=max(args.batch_window_ms, 0.0) / 1000, weights=quantize(model, args.quantize),
                        continuous=args.batching == "continuous", gather_steps=max(args.gather_steps, 0))
        print(f"palm serve: {export.path} ({export.kind}, {seq_len}-token context) as model {name!r} on "
              f"http://{args.host}:{args.port}/v1", flush=True)
        uvicorn.run(make_app(engine, name, limits), host=args.host, port=args.port, log_level="warning")
    return 0
