"""``palm serve`` (palm/apps/openai_server.py): the real server on a tiny exported chat model,
driven by the official ``openai`` client: chat completions (plain and streamed, the streamed
deltas equal to the plain greedy reply), completions, the model list, the limits as the client's
exceptions, and concurrent requests, drawn alike or not, sharing decoding steps (continuous
batching: palm/decode/batcher.py, tested against generate() in tests/test_batcher.py)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import urllib.request
from pathlib import Path

import openai
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import on_free_ports, server  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NAME = "tiny-ppo"


@pytest.fixture(scope="module")
def url(export, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def start(port: int) -> str:
        base = f"http://127.0.0.1:{port}"
        argv = [sys.executable, "-m", "palm.apps.cli", "serve", str(export), "--port", str(port), "--name", NAME,
                "--max-tokens-cap", "16", "--max-messages", "4", "--max-body-bytes", "4096", "--batch-window-ms", "300"]
        stack.enter_context(server(argv, base, log, env=env, timeout_s=120))
        return base

    with contextlib.ExitStack() as stack:
        yield on_free_ports(start)


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def rows_per_step(url: str) -> dict[int, int]:
    """How many decoding steps advanced n requests, by n."""
    with urllib.request.urlopen(f"{url}/v1/palm/stats", timeout=10) as reply:
        return {int(n): c for n, c in json.loads(reply.read())["rows_per_step"].items()}


def shared_steps(before: dict[int, int], after: dict[int, int]) -> int:
    """The most requests one step advanced between two ``rows_per_step`` readings."""
    return max(n for n, c in after.items() if c > before.get(n, 0))


def concurrently(calls: list) -> list:
    """Run the calls at once (one thread each, released together); their results in order."""
    results: dict[int, object] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(calls))

    def one(i: int) -> None:
        try:
            start.wait()
            results[i] = calls[i]()
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == len(calls), errors
    return [results[i] for i in range(len(calls))]


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What does dumps do?"}]


def test_chat_plain_and_streamed_greedy_agree(client):
    reply = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=8, temperature=0)
    text = reply.choices[0].message.content
    assert reply.choices[0].message.role == "assistant" and len(text.strip()) > 0
    assert reply.usage.completion_tokens >= 1 and reply.usage.prompt_tokens > 5
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.choices[0].finish_reason in ("stop", "length")
    chunks = list(client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=8, temperature=0,
                                                 stream=True))
    assert len(chunks) >= 3 and all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason
    # a conversation with an earlier assistant turn is another prompt
    longer = client.chat.completions.create(
        model=NAME, temperature=0, max_tokens=8,
        messages=[*MESSAGES, {"role": "assistant", "content": text}, {"role": "user", "content": "And loads?"}])
    assert longer.usage.prompt_tokens > reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_completions_and_models(client):
    out = client.completions.create(model=NAME, prompt="The json module", max_tokens=5, temperature=0)
    assert out.object == "text_completion" and out.usage.completion_tokens >= 1
    assert isinstance(out.choices[0].text, str)
    again = client.completions.create(model=NAME, prompt="The json module", max_tokens=5, temperature=0)
    assert again.choices[0].text == out.choices[0].text
    streamed = list(client.completions.create(model=NAME, prompt="The json module", max_tokens=5, temperature=0,
                                              stream=True))
    assert "".join(c.choices[0].text for c in streamed) == out.choices[0].text
    assert [m.id for m in client.models.list().data] == [NAME]


def test_limits_are_openai_errors(client):
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=17)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}] * 5, max_tokens=4)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="context") as err:  # 128-token context, 16 new
        client.completions.create(model=NAME, prompt="json " * 200, max_tokens=16)
    assert err.value.body["code"] == "context_length_exceeded" and err.value.status_code == 400
    with pytest.raises(openai.APIStatusError) as err:
        client.completions.create(model=NAME, prompt="x" * 5000, max_tokens=4)
    assert err.value.status_code == 413 and err.value.body["param"] is None
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model=NAME, messages=[{"role": "tool", "content": "hi"}], max_tokens=4)


def test_concurrent_requests_share_decoding_steps(client, url):
    prompts = [f"Question {i}: what does json.{w} do?" for i, w in enumerate(["dumps", "loads", "dump", "load"] * 2)]

    def ask(p: str) -> str:
        return client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": p}], max_tokens=16,
                                              temperature=0).choices[0].message.content

    alone = [ask(p) for p in prompts[:2]]
    before = rows_per_step(url)
    replies = concurrently([lambda p=p: ask(p) for p in prompts])
    assert shared_steps(before, rows_per_step(url)) > 1  # requests shared steps
    # a row decodes as its prompt alone would (greedy, left padding never attended)
    assert replies[:2] == alone


def test_requests_drawn_and_stopped_differently_share_steps(client, url):
    """A plain completion (ends at end of document), a greedy chat reply (end of turn) and a
    sampled one decode in the same steps, each row drawn and ended by its own settings: the greedy
    ones equal their replies alone."""
    def chat(temperature: float) -> str:
        return client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=12,
                                              temperature=temperature).choices[0].message.content

    def text() -> str:
        return client.completions.create(model=NAME, prompt="The json module", max_tokens=16,
                                         temperature=0).choices[0].text

    alone = [chat(0.0), text()]
    before = rows_per_step(url)
    together = concurrently([lambda: chat(0.0), text, lambda: chat(1.0), lambda: chat(0.7)])
    assert shared_steps(before, rows_per_step(url)) >= 3
    assert together[:2] == alone and all(isinstance(t, str) for t in together[2:])
