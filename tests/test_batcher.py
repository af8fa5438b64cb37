"""Continuous batching (palm/decode/batcher.py) against the plain reference: every request's
tokens equal :func:`generate` on its prompt alone (greedy, fp32, exact), whichever step it joins
at, whatever the other rows' prompt lengths, when rows leave early (stop token, own
``max_new_tokens``), when the batch runs past the cache's length (columns dropped) and when a
longer prompt makes the live rows move right, when joins are gathered into one prompt pass;
int8 weights too; static batching for comparison."""

from __future__ import annotations

import pytest
import torch
from helpers import redraw_weights

from palm.core.errors import ConfigError
from palm.decode import layouts
from palm.decode.batcher import Batcher, Request
from palm.decode.decoder import Decoder
from palm.decode.generate import SamplingConfig, generate
from palm.model import parallel
from palm.model.network import ModelConfig, PaLM

CFG = ModelConfig(vocab_size=300, d_model=48, n_layers=3, n_heads=3, head_dim=8, ffn_mult=2.5, seq_len=32)


@pytest.fixture(scope="module")
def model():
    parallel.init_distributed()
    m = PaLM(CFG, seed=3).eval().requires_grad_(False)
    redraw_weights(m, seed=1236)  # greedy decoding does not just repeat a token
    yield m
    parallel.teardown()


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, CFG.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def alone(model, r: Request, weights=None) -> list[int]:
    """The reference: ``r`` decoded by itself, up to and including its stop token."""
    gen = generate(model, [r.prompt], r.max_new_tokens, stop_ids=r.stop_ids, weights=weights)
    return gen.response[0][gen.response_mask[0]].tolist()


def run(batcher: Batcher, schedule: dict[int, list[Request]], trace: list | None = None) -> dict[int, list[int]]:
    """Step ``batcher`` until every request of ``schedule`` (step -> requests added before it) has
    ended; each request's tokens, by ``id``. ``trace``: (live rows, shared length) after each step."""
    out: dict[int, list[int]] = {}
    ended, total, step = 0, sum(len(v) for v in schedule.values()), 0
    while ended < total:
        for r in schedule.get(step, []):
            batcher.add(r)
        for e in batcher.step():
            assert id(e.request) not in out or out[id(e.request)][-1] is not None
            out.setdefault(id(e.request), []).append(e.token)
            ended += e.end is not None
            if e.end == "stop":
                assert e.token in e.request.stop_ids
            elif e.end == "length":
                assert len(out[id(e.request)]) == e.request.max_new_tokens
        assert batcher.length <= batcher.max_len and len(batcher.rows) <= batcher.slots
        if trace is not None:
            trace.append((len(batcher.rows), batcher.length))
        step += 1
        assert step < 500
    assert batcher.idle and batcher.length == 0
    return out


def test_requests_joining_at_different_steps_equal_their_prompts_alone(model):
    reqs = [Request(prompt(n, i), new) for i, (n, new) in enumerate([(3, 12), (2, 9), (7, 6), (1, 12), (10, 5), (4, 8)])]
    trace: list = []
    # 4 slots: the 5th and 6th requests wait for a slot; the 10-token prompt joins a batch
    # whose shared length is shorter, so the live rows move right
    out = run(Batcher(model, 4), {0: reqs[:1], 2: reqs[1:3], 3: reqs[3:5], 5: reqs[5:]}, trace)
    for i, r in enumerate(reqs):
        assert out[id(r)] == alone(model, r), f"request {i}"
    assert max(n for n, _ in trace) == 4  # requests shared steps
    assert len(set(map(len, (r.prompt for r in reqs)))) == 6


def test_rows_leave_early_at_their_stop_token_or_their_own_length(model):
    plain = [Request(prompt(n, 10 + i), 12) for i, n in enumerate((5, 2, 8))]
    # each row's stop token: one its plain continuation makes at step 2, 5 and never
    stops = [alone(model, plain[0])[2], alone(model, plain[1])[5], -1]
    reqs = [Request(r.prompt, new, stop_ids=frozenset({s})) for r, s, new in zip(plain, stops, (12, 12, 4))]
    trace: list = []
    out = run(Batcher(model, 3), {0: reqs}, trace)
    lengths = [len(out[id(r)]) for r in reqs]
    assert lengths == [3, 6, 4]
    for r in reqs:
        assert out[id(r)] == alone(model, r)
    # live rows after each step: each row left the batch at its own end (the rest stepped on without it)
    assert [n for n, _ in trace] == [3, 2, 1, 1, 0]


def test_a_batch_that_runs_past_max_len_drops_columns_no_row_needs(model):
    # one row lives 20 steps while short requests keep joining: the shared length would pass the
    # cache's 32 positions many times over without dropping the leading columns
    long = Request(prompt(6, 30), 20)
    short = [Request(prompt(2 + i % 5, 40 + i), 6 + i % 3) for i in range(12)]
    schedule = {0: [long], **{2 + 3 * i: [r] for i, r in enumerate(short)}}
    trace: list = []
    batcher = Batcher(model, 3)
    out = run(batcher, schedule, trace)
    busy = next(i for i, (n, _) in enumerate(trace) if n == 0)  # steps until the batch first emptied
    assert busy > CFG.seq_len  # more steps than columns: columns were dropped on the way
    for i, r in enumerate([long, *short]):
        assert out[id(r)] == alone(model, r), f"request {i}"


def test_int8_weights_equal_generate_with_them(model):
    from palm.decode.quant import quantize

    weights = quantize(model, "int8")
    reqs = [Request(prompt(n, 50 + i), 8) for i, n in enumerate((4, 9, 1))]
    out = run(Batcher(model, 2, weights=weights), {0: reqs[:1], 3: reqs[1:]})
    for r in reqs:
        assert out[id(r)] == alone(model, r, weights)


def test_rows_drawn_differently_share_a_step(model):
    """A sampled row beside greedy rows: the greedy rows are untouched by it, the sampled one
    follows its own generator (the same draws as decoding it alone with that generator)."""
    hot = SamplingConfig(temperature=1.0, top_p=0.9)
    greedy = [Request(prompt(5, 60), 8), Request(prompt(3, 61), 8)]
    sampled = Request(prompt(4, 62), 8, sampling=hot)
    trace: list = []
    out = run(Batcher(model, 3, generator=torch.Generator().manual_seed(0)), {0: [greedy[0], sampled, greedy[1]]},
              trace)
    assert trace[0][0] == 3
    for r in greedy:
        assert out[id(r)] == alone(model, r)
    assert len(out[id(sampled)]) == 8 and all(0 <= t < CFG.vocab_size for t in out[id(sampled)])
    # the sampled row alone, with the generator state it drew from (greedy rows draw nothing)
    gen = generate(model, [sampled.prompt], 8, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(0))
    assert out[id(sampled)] == gen.response[0].tolist()


def test_a_lone_row_decodes_in_the_plan_for_one_row(model, monkeypatch):
    """Where one row decodes fastest in another layout than a full batch, a lone row uses it
    (its own copy of the weights, the same cache): the same tokens either way."""
    monkeypatch.setattr(Decoder, "plan", staticmethod(
        lambda m, rows, length: layouts.DecodePlan(torch.float32, "transposed" if rows == 1 else "weight")))
    batcher = Batcher(model, 3)
    assert batcher.single is not None and batcher._view(1)[1].layout == "transposed"
    assert batcher._view(2)[1].layout == "weight"
    reqs = [Request(prompt(n, 80 + i), new) for i, (n, new) in enumerate([(4, 10), (6, 3), (2, 9)])]
    trace: list = []
    out = run(batcher, {0: reqs[:1], 3: reqs[1:2], 8: reqs[2:]}, trace)
    assert {n for n, _ in trace} >= {1, 2}  # alone, together, alone again
    for r in reqs:
        assert out[id(r)] == alone(model, r)


def test_requests_arriving_at_a_busy_batch_gather_for_one_prompt_pass(model, monkeypatch):
    # (the model's own plan: no measuring one for 16 rows, slow on a busy host)
    monkeypatch.setattr(Decoder, "plan", staticmethod(lambda m, rows, length: layouts.DecodePlan(torch.float32)))
    batcher = Batcher(model, 16, gather_steps=2)  # a group: 16 / 8 = 2 waiting requests
    first, a, b, c = [Request(prompt(3 + i, 90 + i), 12) for i in range(4)]
    trace: list = []
    out = run(batcher, {0: [first], 1: [a], 5: [b, c]}, trace)
    # an empty batch takes a request at once; a lone one waits 2 steps for company, a pair joins at once
    assert [n for n, _ in trace[:6]] == [1, 1, 1, 2, 2, 4]
    assert batcher.prompt_passes == 3
    for r in (first, a, b, c):
        assert out[id(r)] == alone(model, r)


def test_static_batching_joins_only_an_empty_batch(model):
    first = Request(prompt(3, 70), 10)
    late = Request(prompt(2, 71), 3)
    trace: list = []
    out = run(Batcher(model, 4, continuous=False), {0: [first], 1: [late]}, trace)
    assert [n for n, _ in trace] == [1] * 8 + [0, 1, 0]  # the late one waited for the first to end
    trace = []
    run(Batcher(model, 4), {0: [first], 1: [late]}, trace)
    assert [n for n, _ in trace][:3] == [1, 2, 1]  # continuous: it joined at once
    assert out[id(late)] == alone(model, late)


def test_requests_that_can_never_fit_are_refused_in_one_line(model):
    batcher = Batcher(model, 3)
    for bad, what in ((Request([], 4), "empty"), (Request([1] * 30, 3), "exceeds"),
                      (Request([1, CFG.vocab_size], 2), "vocabulary"), (Request([1], 0), ">= 1")):
        with pytest.raises(ConfigError, match=what) as err:
            batcher.add(bad)
        assert "\n" not in str(err.value)
    assert batcher.idle
