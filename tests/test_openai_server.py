"""``palm serve`` (palm/apps/openai_server.py): the real server on a tiny exported chat model,
driven by the official ``openai`` client: chat completions (plain and streamed, the streamed
deltas equal to the plain greedy reply), completions, the model list, the limits as the client's
exceptions, and concurrent requests decoded together in batches."""

from __future__ import annotations

import json
import os
import sys
import threading
import urllib.request
from pathlib import Path

import openai
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import free_port, server  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NAME = "tiny-ppo"


@pytest.fixture(scope="module")
def url(export, tmp_path_factory):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    argv = [sys.executable, "-m", "palm.apps.cli", "serve", str(export), "--port", str(port), "--name", NAME,
            "--max-tokens-cap", "16", "--max-messages", "4", "--max-body-bytes", "4096", "--batch-window-ms", "300"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with server(argv, base, log, env=env, timeout_s=120):
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def stats(url: str) -> list[int]:
    with urllib.request.urlopen(f"{url}/v1/palm/stats", timeout=10) as reply:
        return json.loads(reply.read())["batches"]


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


def test_concurrent_requests_are_decoded_in_batches(client, url):
    before = len(stats(url))
    prompts = [f"Question {i}: what does json.{w} do?" for i, w in enumerate(["dumps", "loads", "dump", "load"] * 2)]
    alone = [client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": p}], max_tokens=16,
                                            temperature=0).choices[0].message.content for p in prompts[:2]]
    replies: dict[int, str] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(prompts))

    def ask(i: int) -> None:
        try:
            start.wait()
            r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": prompts[i]}],
                                               max_tokens=16, temperature=0)
            replies[i] = r.choices[0].message.content
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(replies) == len(prompts)
    batches = stats(url)[before + 2:]
    assert sum(batches) == len(prompts) and max(batches) > 1, batches  # requests shared a batch
    # a row decodes as its prompt alone would (greedy, left padding never attended)
    assert [replies[0], replies[1]] == alone


def test_a_batch_holds_only_requests_drawn_and_stopped_alike():
    """One generate() call samples every row alike and stops rows at one set of tokens: a plain
    completion (ends at end of document) must not share a batch with chat replies (end of turn),
    which would cut it at a turn's end; nor requests with other sampling settings."""
    import queue

    from palm.apps.openai_server import Engine, Job

    engine = Engine.__new__(Engine)  # the batching rule alone: no model, no worker thread
    engine.max_batch, engine.seq_len, engine.window_s = 16, 64, 0.0
    engine.jobs, engine.waiting = queue.Queue(), []

    def job(stop_ids: tuple, temperature: float = 0.0) -> Job:
        return Job([1, 2, 3], 4, temperature, None, stop_ids, emit=lambda e: None)

    chat, text, chat2, hot = job((5, 0)), job((0,)), job((5, 0)), job((5, 0), 1.0)
    for j in (chat, text, chat2, hot):
        engine.jobs.put(j)
    taken = []
    while not engine.jobs.empty() or engine.waiting:  # (_take waits for a request when none is left)
        taken.append(engine._take())
    assert [[id(j) for j in batch] for batch in taken] == [[id(chat), id(chat2)], [id(text)], [id(hot)]]
