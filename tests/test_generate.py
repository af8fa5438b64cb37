"""Generation (palm/decode/generate.py) against slow, obvious versions, single process, fp32.

TP=2 (all ranks return the same tokens, cached equals uncached on a padded batch) runs in
tests/test_parallel_numerics.py through the parity worker's ``decode`` layout; the naive-model
check of a padded batch is in tests/test_reference.py.
"""

from __future__ import annotations

import pytest
import torch
from helpers import redraw_weights

from palm.core.errors import ConfigError, UserError
from palm.decode import layouts
from palm.decode.cache import new_cache
from palm.decode.decoder import Decoder
from palm.decode.generate import GREEDY_BLOCK, SamplingConfig, draw, generate, greedy_max, sampling_logprobs
from palm.model import parallel
from palm.model.network import ModelConfig, PaLM

CFG = ModelConfig(vocab_size=300, d_model=48, n_layers=3, n_heads=3, head_dim=8, ffn_mult=2.5,
                  seq_len=32)
LENGTHS = (7, 2, 5, 1)  # a batch of prompts of different lengths: rows 1-3 are left-padded
NEW = 12


@pytest.fixture(scope="module")
def model():
    parallel.init_distributed()
    m = PaLM(CFG, seed=3).eval()
    redraw_weights(m, seed=1236)  # every part of the model matters: greedy decoding does not just repeat
    yield m
    parallel.teardown()


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(11)
    return [torch.randint(0, CFG.vocab_size, (n,), generator=g) for n in LENGTHS]


def full_pass_logits(model: PaLM, gen, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row ``r``'s final sequence without padding through one plain forward pass: the logits
    that predicted each response token ``[n, V]`` and those tokens ``[n]``."""
    row = gen.tokens[r, gen.pad[r]:]
    start = gen.prompt_len - int(gen.pad[r])  # index of the first response token in ``row``
    with torch.no_grad():
        logits = model(row[None])[0, :, :CFG.vocab_size].float()
    return logits[start - 1:-1], row[start:]


def test_cached_equals_uncached_greedy_on_a_padded_batch(model, prompts):
    cached = generate(model, prompts, NEW)
    uncached = generate(model, prompts, NEW, use_cache=False)
    assert cached.tokens.shape == (4, 7 + NEW) and cached.prompt_len == 7
    assert cached.pad.tolist() == [0, 5, 2, 6]
    # premise: continuations are not one token repeated (then attention would hardly matter)
    assert all(len(set(r.tolist())) > 3 for r in cached.response)
    assert torch.equal(cached.tokens, uncached.tokens)
    assert torch.allclose(cached.raw_logprobs, uncached.raw_logprobs, atol=1e-5)
    assert cached.response_mask.all() and not cached.stopped.any()
    assert (cached.logprobs == 0).all()  # greedy: the sampling distribution is a point mass
    # prompts sit right-aligned, padding on the left
    for r, p in enumerate(prompts):
        assert torch.equal(cached.tokens[r, cached.pad[r]:7], p)
        assert (cached.tokens[r, :cached.pad[r]] == 0).all()
    assert cached.attention_mask.sum(1).tolist() == [n + NEW for n in LENGTHS]


def test_each_row_of_a_padded_batch_equals_its_prompt_alone(model, prompts):
    batch = generate(model, prompts, NEW)
    for r, p in enumerate(prompts):
        alone = generate(model, [p], NEW)
        assert alone.pad.tolist() == [0]
        assert torch.equal(batch.response[r], alone.response[0]), f"row {r}"
        assert torch.allclose(batch.raw_logprobs[r], alone.raw_logprobs[0], atol=1e-5), f"row {r}"


@pytest.mark.parametrize("sampling", [dict(temperature=1.0), dict(temperature=0.7, top_k=40),
                                      dict(temperature=1.3, top_k=60, top_p=0.8)])
def test_logprobs_equal_a_full_forward_pass(model, prompts, sampling):
    """Both returned log-probs of every sampled token against one plain forward pass over the
    final sequences: the raw model's log-softmax, and the sampling distribution built from those
    logits (temperature, top-k, top-p)."""
    gen = generate(model, prompts, NEW, generator=torch.Generator().manual_seed(1), **sampling)
    cfg = SamplingConfig(**sampling)
    for r in range(len(prompts)):
        logits, tokens = full_pass_logits(model, gen, r)
        raw = logits.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)
        used = sampling_logprobs(logits, cfg).gather(-1, tokens[:, None]).squeeze(-1)
        assert torch.isfinite(used).all()  # every sampled token was in the kept set
        assert (gen.raw_logprobs[r] - raw).abs().max() < 1e-4, r
        assert (gen.logprobs[r] - used).abs().max() < 1e-4, r
    if sampling == dict(temperature=1.0):  # sampling from the model itself: the same numbers
        assert torch.allclose(gen.logprobs, gen.raw_logprobs, atol=1e-6)
    else:
        assert not torch.allclose(gen.logprobs, gen.raw_logprobs, atol=1e-3)


def test_rows_stop_at_their_stop_token(model, prompts):
    free = generate(model, prompts, NEW)
    # stop ids: row 0's 3rd token and row 2's 6th; where each row first emits either decides
    stop = {int(free.response[0, 2]), int(free.response[2, 5])}
    first = []
    for r in range(len(prompts)):
        hits = [j for j, t in enumerate(free.response[r].tolist()) if t in stop]
        first.append(hits[0] if hits else None)
    assert len({f for f in first}) > 1, first  # premise: rows stop at different steps
    pad_id = CFG.vocab_size - 1
    got = generate(model, prompts, NEW, stop_ids=stop, pad_id=pad_id)
    n = max(NEW - 1 if f is None else f for f in first) + 1
    assert got.response.shape == (4, n)  # the loop ends once every row has stopped
    for r, f in enumerate(first):
        end = n if f is None else f + 1  # the stop token itself is part of the response
        assert got.stopped[r].item() == (f is not None)
        assert torch.equal(got.response[r, :end], free.response[r, :end])
        assert got.response_mask[r, :end].all() and not got.response_mask[r, end:].any()
        assert (got.response[r, end:] == pad_id).all()
        assert (got.logprobs[r, end:] == 0).all() and (got.raw_logprobs[r, end:] == 0).all()
        assert torch.allclose(got.raw_logprobs[r, :end], free.raw_logprobs[r, :end], atol=1e-5)


def slow_sampling_probs(logits: torch.Tensor, temperature: float, top_k, top_p) -> torch.Tensor:
    """The sampling distribution one row and one token at a time, in float64."""
    out = torch.zeros(logits.shape, dtype=torch.float64)
    for r, row in enumerate(logits.double() / temperature):
        order = sorted(range(len(row)), key=lambda i: -float(row[i]))
        kept = order if top_k is None else [i for i in order if row[i] >= row[order[top_k - 1]]]
        z = torch.stack([row[i] for i in kept])
        p = torch.exp(z - z.max())
        p = p / p.sum()
        if top_p is not None:
            mass, nucleus = 0.0, []
            for i, pi in zip(kept, p.tolist()):
                if mass >= top_p:
                    break
                nucleus.append(i)
                mass += pi
            kept = nucleus
            z = torch.stack([row[i] for i in kept])
            p = torch.exp(z - z.max())
            p = p / p.sum()
        for i, pi in zip(kept, p.tolist()):
            out[r, i] = pi
    return out


def test_on_token_streams_each_step_as_it_is_made(model, prompts):
    free = generate(model, prompts, NEW)
    stop = {int(free.response[1, 3])}
    seen = []
    got = generate(model, prompts, NEW, stop_ids=stop, pad_id=CFG.vocab_size - 1,
                   on_token=lambda token, live: seen.append((token.clone(), live.clone())))
    assert len(seen) == got.response.shape[1]  # one call per step run
    assert torch.equal(torch.stack([t for t, _ in seen], 1), got.response)
    assert torch.equal(torch.stack([l for _, l in seen], 1), got.response_mask)


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, None, None), (0.5, None, None), (1.0, 5, None), (0.8, 1, None), (1.0, None, 0.5),
    (1.5, None, 0.9), (0.7, 10, 0.6), (1.0, 64, 1.0), (1.0, None, 1e-6)])
def test_top_k_top_p_against_a_slow_reference(temperature, top_k, top_p):
    logits = torch.randn(5, 64, generator=torch.Generator().manual_seed(2)) * 3
    got = sampling_logprobs(logits, SamplingConfig(temperature, top_k, top_p)).exp().double()
    want = slow_sampling_probs(logits, temperature, top_k, top_p)
    assert torch.equal(got > 0, want > 0)  # the same kept set
    assert torch.allclose(got, want, atol=1e-6)
    if (top_k is not None and top_k < 64) or (top_p is not None and top_p < 1):
        assert (want == 0).any()  # premise: the truncation removed something


def test_draw_follows_the_weights_and_never_draws_a_zero():
    w = torch.tensor([[0.0, 0.1, 0.0, 0.3, 0.6, 0.0],    # zeros first, between and last
                      [5.0, 0.0, 0.0, 0.0, 0.0, 0.0],    # one index: always it
                      [0.0, 0.0, 0.0, 0.0, 0.0, 1e-30],  # the last index, a tiny (unnormalised) weight
                      [1e-4, 0.0, 0.0, 0.0, 2.0, 2.0]])
    n = 100_000
    g = torch.Generator().manual_seed(3)
    got = torch.stack([draw(w, g) for _ in range(n)])  # [n, 4]
    counts = torch.stack([torch.bincount(got[:, r], minlength=6) for r in range(4)]).double()
    p = w.double() / w.double().sum(1, keepdim=True)
    assert (counts[p == 0] == 0).all()
    sd = (n * p * (1 - p)).sqrt()
    assert ((counts - n * p).abs() <= 5 * sd + 1).all(), (counts / n, p)  # binomial: 5 standard deviations
    assert counts[3, 0] > 0  # a weight of 1e-4 next to 2 is still drawn (~10 times in 1e5)


@pytest.mark.parametrize("rows,vocab", [(16, 8192), (3, 4 * GREEDY_BLOCK), (1, 8192), (4, 1000), (5, 64)])
def test_greedy_max_is_each_rows_maximum_at_its_first_index(rows, vocab):
    """Against the obvious loop, on rows full of ties (within a block and across blocks), with
    -inf entries and a maximum only in the last block: over several rows a vocabulary that is a
    multiple of GREEDY_BLOCK goes through the blocks, one row or another vocabulary through max()."""
    x = torch.randint(-3, 4, (rows, vocab), generator=torch.Generator().manual_seed(5)).float()
    x[0, : vocab // 2] = float("-inf")
    x[-1] = -1.0
    x[-1, -1] = x[-1, -2] = 0.5  # the maximum only in the last block, twice
    best, index = greedy_max(x)
    for r in range(rows):
        row = x[r].tolist()
        assert best[r].item() == max(row) and index[r].item() == row.index(max(row)), r
    assert (x == x.amax(-1, keepdim=True)).sum(-1).min() >= 2  # premise: every row has ties at its maximum


def test_generated_tensors_serve_autograd(model, prompts):
    """Generation runs in inference mode; what it returns must still go into PPO's update, where
    autograd saves the tokens (an embedding lookup) and the log-probs (a product) for backward."""
    gen = generate(model, prompts, NEW, temperature=1.0, generator=torch.Generator().manual_seed(2))
    fields = (gen.tokens, gen.pad, gen.response_mask, gen.logprobs, gen.raw_logprobs, gen.stopped)
    assert not any(t.is_inference() for t in fields)
    emb = torch.nn.Embedding(CFG.vocab_size, 4)
    scale = torch.ones(1, requires_grad=True)
    loss = (emb(gen.tokens)[:, gen.prompt_len:].sum(-1) * (gen.logprobs * scale)).sum()
    loss.backward()
    assert emb.weight.grad is not None and scale.grad is not None


def test_truncation_to_one_token_is_greedy(model, prompts):
    greedy = generate(model, prompts, NEW)
    g = torch.Generator().manual_seed(0)
    for kw in (dict(top_k=1), dict(top_p=1e-6)):
        one = generate(model, prompts, NEW, temperature=1.0, generator=g, **kw)
        assert torch.equal(one.tokens, greedy.tokens), kw
        assert (one.logprobs == 0).all()  # a point mass
        assert torch.allclose(one.raw_logprobs, greedy.raw_logprobs, atol=1e-5)


def test_a_seeded_generator_gives_the_same_samples_twice(model, prompts):
    def run(seed):
        return generate(model, prompts, NEW, temperature=1.0, top_p=0.95,
                        generator=torch.Generator().manual_seed(seed))

    a, b, c = run(5), run(5), run(6)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.tokens, c.tokens)


def test_bad_requests_give_one_clear_line(model, prompts):
    with pytest.raises(ConfigError) as err:
        generate(model, prompts, CFG.seq_len - 6)  # longest prompt 7 + 26 = 33 > 32
    assert str(err.value) == ("max_new_tokens: longest prompt 7 + max_new_tokens 26 = 33 exceeds "
                              "model.seq_len=32")
    generate(model, prompts, CFG.seq_len - 7)  # exactly the context: fine
    for kwargs, key in ((dict(temperature=-1.0), "temperature"), (dict(top_k=0), "top_k"),
                        (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p")):
        with pytest.raises(ConfigError, match=f"^{key}: "):
            generate(model, prompts, 2, **kwargs)
    for bad, key in (([], "prompts"), ([[1, 2], []], "prompts"), ([[1, CFG.vocab_size]], "prompts")):
        with pytest.raises(ConfigError, match=f"^{key}: ") as err:
            generate(model, bad, 2)
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="^max_new_tokens: must be >= 1"):
        generate(model, prompts, 0)


def test_a_pipeline_stage_is_refused(model):
    stage = PaLM(CFG, post_process=False, layers=[0]).eval()
    with pytest.raises(UserError, match="generation needs the whole model.*pipeline_parallel=1"):
        generate(stage, [[1, 2, 3]], 2)


def test_the_cache_gives_each_row_rope_position_zero_at_its_first_real_token(model):
    """RoPE is relative, so a shifted row would give the same tokens up to rounding: checked on
    the cache's own tables instead."""
    pad = torch.tensor([0, 3, 1])
    cache = new_cache(model, 3, 10, pad)
    for r, p in enumerate(pad.tolist()):
        assert torch.equal(cache.cos[r, p:, 0], model.rope.cos[:10 - p])
        assert torch.equal(cache.sin[r, p:, 0], model.rope.sin[:10 - p])
        assert (cache.key_bias[r, 0, :p] == float("-inf")).all() and (cache.key_bias[r, 0, p:] == 0).all()
    assert new_cache(model, 3, 10, torch.zeros(3, dtype=torch.long)).key_bias is None  # plain causal
    with pytest.raises(ConfigError, match="^model.seq_len: a KV cache of 33 positions exceeds"):
        new_cache(model, 1, CFG.seq_len + 1)


def copy_module(m: PaLM, dtype: torch.dtype) -> PaLM:
    out = PaLM(CFG, parallel.megatron_config(CFG, dtype=dtype), seed=3).eval()  # as the engine builds it
    out.load_state_dict(m.state_dict())  # cast into out's dtype
    return out


PLANS = [layouts.DecodePlan(torch.float32, layout) for layout in layouts.LAYOUTS]


@pytest.mark.parametrize("plan", PLANS, ids=layouts.LAYOUTS)
def test_every_decode_plan_equals_uncached_greedy(model, prompts, plan, monkeypatch):
    """Whichever plan the probe picks on a machine, cached decoding is the same function: for a
    batch of prompts and for one prompt (one row a step: its own GEMM path)."""
    monkeypatch.setattr(Decoder, "plan", staticmethod(lambda m, batch, length: plan))
    for batch in (prompts, prompts[:1]):
        cached = generate(model, batch, NEW)
        uncached = generate(model, batch, NEW, use_cache=False)
        assert torch.equal(cached.tokens, uncached.tokens)
        assert torch.allclose(cached.raw_logprobs, uncached.raw_logprobs, atol=1e-5)


def test_a_bf16_model_decoded_from_an_fp32_copy_is_that_copy(model, prompts, monkeypatch):
    """The fp32 plan of a bf16 model computes in fp32 from the bf16 weights: the logits of the
    model cast to fp32 (its full forward pass), and greedy tokens equal to that copy's."""
    half = copy_module(model, torch.bfloat16)
    copy = copy_module(half, torch.float32)  # fp32 parameters holding the bf16 values
    seq = torch.cat([prompts[0], prompts[2]])[None]  # one row of 12 tokens
    for plan in PLANS:
        with torch.no_grad():
            decoder = Decoder(half, new_cache(half, 1, dtype=torch.float32), plan)
            steps = [decoder(seq[:, :6])] + [decoder(seq[:, i:i + 1]) for i in range(6, 12)]
            full = copy(seq)[0, 5:]  # positions 5..11
        assert (torch.cat(steps) - full).abs().max().item() < 1e-4, plan
    monkeypatch.setattr(Decoder, "plan", staticmethod(lambda m, batch, length: PLANS[0]))
    assert torch.equal(generate(half, prompts, NEW).tokens, generate(copy, prompts, NEW).tokens)


def test_the_decode_plan_is_measured_once_and_is_a_candidate(model, monkeypatch):
    calls = []
    fastest = Decoder._fastest

    def counted(*args):
        calls.append(args[2:])
        return fastest(*args)

    monkeypatch.setattr(Decoder, "_fastest", staticmethod(counted))
    monkeypatch.setattr("palm.decode.decoder._PLANS", {})
    half = copy_module(model, torch.bfloat16)
    for _ in range(2):
        plan = Decoder.plan(half, 3, 20)
        assert plan in [layouts.DecodePlan(dt, layout) for dt in (torch.bfloat16, torch.float32)
                        for layout in layouts.LAYOUTS if layout != "openblas" or dt == torch.float32]
    assert calls == [(4, 32)]  # rows and length rounded up to powers of two; the second call reused it
    assert Decoder.plan(half, 4, 17) == plan and len(calls) == 1  # the same size class
    tried = []  # one prompt: every layout too (on an AMD EPYC MKL's stored transposes: 1.3x the tokens/s)
    init = Decoder.__init__
    monkeypatch.setattr(Decoder, "__init__", lambda self, m, cache, plan=None: tried.append(plan) or init(self, m, cache, plan))
    assert Decoder.plan(model, 1, 20) in PLANS and calls[-1] == (1, 32) and set(tried) == set(PLANS)


def test_a_layout_without_kernels_on_this_cpu_is_skipped(model, monkeypatch):
    """oneDNN refuses bf16 weights on CPUs without AVX-512 or AVX-NE-CONVERT: the probe drops a
    candidate whose weights cannot be held, and picks among the others."""
    real = layouts.DecodeWeight.__init__

    def refuse(self, weight, layout, rows):
        if layout == "packed":
            raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support ...")
        real(self, weight, layout, rows)

    monkeypatch.setattr(layouts.DecodeWeight, "__init__", refuse)
    plan = Decoder._fastest(model, torch.float32, 2, 16)
    assert plan.layout != "packed" and plan in PLANS


def test_a_near_tie_keeps_the_earlier_plan():
    """The plan chosen is the first (the model's own first) within PLAN_MARGIN of the fastest, so
    the timing noise of a run cannot switch between two plans that decode about as fast."""
    weight, transposed, packed, openblas = PLANS
    assert Decoder._settle({weight: 1.0, transposed: 0.7, packed: 0.5, openblas: 0.47}) == packed
    assert Decoder._settle({weight: 1.0, transposed: 0.7, packed: 0.5, openblas: 0.4}) == openblas
    assert Decoder._settle({weight: 1.0, transposed: 0.95, packed: 0.99, openblas: 0.93}) == weight
    assert Decoder._settle({weight: 1.0, packed: 0.8}) == packed  # a candidate without kernels: absent


def test_the_probe_rebuilds_its_decoders_each_round_when_they_would_not_fit(model, monkeypatch):
    """Above PLAN_KEEP_BYTES (a large model: one weight copy per candidate) the candidates'
    decoders are made round by round (the untimed first round too), one at a time, instead of
    living through every round."""
    made = []
    init = Decoder.__init__
    monkeypatch.setattr(Decoder, "__init__", lambda self, m, cache, plan=None: made.append(plan) or init(self, m, cache, plan))
    assert Decoder._fastest(model, torch.float32, 2, 16, rounds=3) in PLANS
    assert sorted(made, key=PLANS.index) == PLANS  # kept: one decoder per candidate
    made.clear()
    monkeypatch.setattr("palm.decode.decoder.PLAN_KEEP_BYTES", 0)
    assert Decoder._fastest(model, torch.float32, 2, 16, rounds=3) in PLANS
    assert sorted(made, key=PLANS.index) == [p for p in PLANS for _ in range(1 + 3)]  # the untimed round too


@pytest.mark.parametrize("layout", layouts.LAYOUTS)
def test_every_weight_layout_is_the_linear_map(layout):
    """One row, a decoding batch, a prompt pass beyond FEW_ROWS, and a 3-D input: x @ W.T."""
    w = torch.randn(24, 40)
    held = layouts.DecodeWeight(w, layout, rows=4)
    with layouts.decode_threads(layouts.DecodePlan(torch.float32, layout)):
        for shape in [(1, 40), (4, 40), (parallel.FEW_ROWS + 6, 40), (3, 5, 40)]:
            x = torch.randn(*shape)
            got = held(x)
            assert got.shape == (*shape[:-1], 24) and got.dtype == torch.float32
            assert torch.allclose(got, x @ w.t(), atol=1e-5), (layout, shape)


def test_numpy_blas_decodes_with_torch_on_one_thread():
    """The openblas layout: torch's ops on one thread inside (two thread pools spinning on the same
    cores ruin both), numpy's BLAS on as many as torch had; both restored after, errors included."""
    from threadpoolctl import threadpool_info

    blas = lambda: {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}  # noqa: E731
    before, threads = blas(), torch.get_num_threads()
    torch.set_num_threads(1)  # as a TP rank of two on two cores: BLAS must not take both cores
    try:
        with pytest.raises(ValueError, match="inside"):
            with layouts.decode_threads(layouts.DecodePlan(torch.float32, "openblas")):
                assert torch.get_num_threads() == 1 and blas() == {1}
                raise ValueError("inside")
        assert torch.get_num_threads() == 1 and blas() == before
        torch.set_num_threads(2)
        with layouts.decode_threads(layouts.DecodePlan(torch.float32, "openblas")):
            assert torch.get_num_threads() == 1 and blas() == {2}
        assert torch.get_num_threads() == 2
        with layouts.decode_threads(layouts.DecodePlan(torch.float32, "packed")):
            assert torch.get_num_threads() == 2  # other layouts: untouched
    finally:
        torch.set_num_threads(threads)


def test_one_row_uses_the_stored_transpose():
    """Given the transpose, one row is multiplied by it (not by the weight): a zero 'transpose'
    shows which operand was read."""
    x, w = torch.randn(1, 1, 8), torch.randn(5, 8)
    assert torch.allclose(parallel.plain_linear(x, w), x @ w.t())
    assert torch.equal(parallel.plain_linear(x, w, torch.zeros(8, 5)), torch.zeros(1, 1, 5))
