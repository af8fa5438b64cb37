"""int8 weight-only decoding (palm/decode/quant.py, the native ``palm_int8_linear``): the kernel
against a naive reference that rounds the same way (both the AVX2 and the portable build), the
rounding's error bound, an int8 decoder against an fp32 decoder of the dequantized weights (the
same function but for the rows' 14-bit rounding), greedy agreement with fp32 on a small random
model, ``--quantize`` wired through ``palm chat`` and ``palm serve``, and that nothing in training
can decode from int8 weights: a trainable model is refused, stale or foreign weights are refused,
and no training module imports the quantizer."""

from __future__ import annotations

import argparse
import ast
import io
import sys
import types
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import MODEL, redraw_weights  # noqa: E402

from palm.core.errors import UserError  # noqa: E402
from palm.decode import layouts, native, quant  # noqa: E402
from palm.decode.cache import new_cache  # noqa: E402
from palm.decode.decoder import Decoder, stack  # noqa: E402
from palm.decode.generate import generate  # noqa: E402
from palm.model.network import PaLM  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def naive_int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What ``palm_int8_linear`` computes, the slow obvious way: each row of ``x`` rounded to
    int16 with scale ``max|x_r| / 8191`` (as the kernel: times the fp32 reciprocal, half to even),
    the integer products summed exactly (float64 holds them), then both scales."""
    a = x.abs().amax(dim=1)
    inv = torch.where(a > 0, torch.tensor(8191.0) / a, torch.zeros_like(a))
    xs = torch.where(a > 0, a / 8191.0, torch.ones_like(a))
    xq = torch.round(x * inv[:, None])
    return (xq.double() @ q.double().T * (xs[:, None] * scale[None, :]).double()).float()


@pytest.fixture(params=["native", "portable"])
def lib(request):
    """The kernel as built here (-march=native) and without AVX2 (plain loops)."""
    built = native.load(portable=request.param == "portable")
    if built is None:
        pytest.skip("no compiled kernel here (no C compiler or PALM_NATIVE=0)")
    return built


@pytest.mark.parametrize("m", [1, 3, 4, 5, 16])
@pytest.mark.parametrize("n,k", [(1, 16), (5, 32), (37, 64), (64, 1280)])
def test_the_int8_kernel_equals_the_naive_reference(lib, m, n, k):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    x[0, :] *= 100.0  # rows of different scales: each has its own
    if m > 2:
        x[2] = 0.0  # an all-zero row
    q, scale = quant.quantize_rows(w)
    out = native.Int8Linear.make(q, scale, lib)(x)
    assert out.shape == (m, n)
    ref = naive_int8_linear(x, q, scale)
    # the same integer sums; only the final fp32 conversion and scaling round (a few ulp)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6 * float(ref.abs().max()) + 1e-12)
    # and close to the dequantized product: the rows' 14-bit rounding is all that differs
    exact = x.double() @ quant.dequantize(q, scale).double().T
    assert float((out - exact).abs().max()) <= 2e-4 * float(x.abs().amax(1).max()) * float(scale.max()) * 127 * k ** 0.5


def test_shapes_the_kernel_does_not_take_fall_back_to_the_dequantized_weights():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 24, generator=g), torch.randn(5, 24, generator=g)  # k not a multiple of 16
    held = quant.Int8Weight(w)
    assert held.kernel is None and native.Int8Linear.make(held.q, held.scale) is None
    torch.testing.assert_close(held(x[None]), (x @ quant.dequantize(held.q, held.scale).T)[None])
    many = torch.randn(quant.KERNEL_ROWS + 1, 32, generator=g)  # a prompt pass: through an fp32 copy
    held = quant.Int8Weight(torch.randn(7, 32, generator=g))
    torch.testing.assert_close(held(many), many @ quant.dequantize(held.q, held.scale).T)


def test_quantize_then_dequantize_is_within_half_a_step_per_channel():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 48, generator=g) * torch.logspace(-3, 1, 64)[:, None]  # channels of every scale
    w[5] = 0.0
    q, scale = quant.quantize_rows(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127 and scale.shape == (64,)
    err = (quant.dequantize(q, scale) - w).abs()
    assert bool((err <= scale[:, None] / 2 * (1 + 1e-6)).all())  # half a step of the row's own scale
    assert bool((q[5] == 0).all()) and float(scale[5]) == 1.0  # a zero row stays exactly zero
    assert bool((q.abs().amax(dim=1)[torch.arange(64) != 5] == 127).all())  # each row's largest: +-127


@pytest.fixture
def model(single):
    net = PaLM(MODEL, seed=3)
    redraw_weights(net, seed=5)
    return net.eval().requires_grad_(False)


def test_the_int8_decoder_is_the_fp32_decoder_of_the_dequantized_weights(model):
    """Cached decoding through the int8 kernel against an fp32 decoder holding the dequantized
    weights: the same function but for the rows' 14-bit rounding."""
    weights = quant.quantize(model, "int8")
    deq = lambda w: layouts.DecodeWeight(quant.dequantize(*quant.quantize_rows(w)), "weight", rows=2)  # noqa: E731
    blocks, final_norm, output = stack(model, torch.float32, deq, deq)
    reference = types.SimpleNamespace(blocks=blocks, final_norm=final_norm, output=output, check=lambda m: None)
    plan = layouts.DecodePlan(torch.float32)
    prompt = torch.randint(0, MODEL.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    a = Decoder(model, new_cache(model, 2, 20, dtype=torch.float32), plan, weights)
    b = Decoder(model, new_cache(model, 2, 20, dtype=torch.float32), plan, reference)
    tokens = prompt
    for _ in range(6):
        la, lb = a(tokens), b(tokens)
        torch.testing.assert_close(la, lb, rtol=0, atol=2e-3 * float(lb.abs().max()))
        tokens = lb.argmax(dim=-1, keepdim=True)


def test_greedy_int8_decoding_runs_and_mostly_agrees_with_fp32(model):
    prompts = [torch.randint(0, MODEL.vocab_size, (5 + i,), generator=torch.Generator().manual_seed(i)) for i in range(8)]
    fp32 = generate(model, prompts, 12)
    int8 = generate(model, prompts, 12, weights=quant.quantize(model, "int8"))
    assert int8.tokens.shape == fp32.tokens.shape and bool((int8.tokens >= 0).all())
    first = float((int8.response[:, 0] == fp32.response[:, 0]).float().mean())  # the same prompts
    assert first >= 0.75, first
    # one row's decoding is the same whether it shares its batch or not (left padding, its own scale)
    alone = generate(model, prompts[:1], 12, weights=quant.quantize(model, "int8"))
    assert torch.equal(alone.response[0], int8.response[0])


def test_a_trainable_model_is_refused_and_changed_or_foreign_weights_too(single):
    policy = PaLM(MODEL, seed=3)  # a policy in training: parameters that require grad
    with pytest.raises(UserError, match="not for a model in training"):
        quant.quantize(policy, "int8")
    assert quant.quantize(policy, "none") is None  # the fp32 path: nothing made, nothing refused
    with pytest.raises(UserError, match="none or int8"):
        quant.quantize(policy, "int4")
    frozen = policy.requires_grad_(False)
    weights = quant.quantize(frozen, "int8")
    generate(frozen, [[1, 2, 3]], 2, weights=weights)
    with pytest.raises(UserError, match="another model"):
        generate(PaLM(MODEL, seed=4).requires_grad_(False), [[1, 2, 3]], 2, weights=weights)
    with torch.no_grad():  # an optimizer step changes the weights in place
        next(frozen.parameters()).add_(0.01)
    with pytest.raises(UserError, match="changed since"):
        generate(frozen, [[1, 2, 3]], 2, weights=weights)


def test_no_training_module_can_reach_the_quantizer():
    """PPO's rollouts (palm.train.rlhf) and every other training or stage module decode with the
    model's own weights: none of them imports palm.decode.quant, so none can hand int8 weights to
    generate()."""
    users = []
    for top in ("palm/train", "palm/eval", "stages", "pipelines"):
        for path in (ROOT / top).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
                         if isinstance(node, ast.ImportFrom) else
                         [a.name for a in node.names] if isinstance(node, ast.Import) else [])
                if any(n.startswith("palm.decode.quant") for n in names):
                    users.append(str(path.relative_to(ROOT)))
    assert users == []
    rollout = (ROOT / "palm/train/rlhf/rollout.py").read_text()
    assert "generate(" in rollout and "weights=" not in rollout  # premise: the rollout's own call


def test_chat_quantize_flag_decodes_from_int8_weights(export, capsys):
    from palm.apps import chat
    from palm.model.export import load_model, load_tokenizer, read_export
    from palm.model.parallel import process_groups

    p = argparse.ArgumentParser()
    chat.add_arguments(p)
    assert p.parse_args([str(export)]).quantize == "none"
    with pytest.raises(SystemExit):
        p.parse_args([str(export), "--quantize", "int4"])
    capsys.readouterr()
    args = p.parse_args([str(export), "--quantize", "int8", "--temperature", "0", "--max-new-tokens", "8"])
    out, err = io.StringIO(), io.StringIO()
    assert chat.run(args, stdin=io.StringIO("What does dumps do?\n"), stdout=out, stderr=err) == 0
    ex = read_export(export)
    with process_groups():
        model = load_model(ex).requires_grad_(False)
        s = chat.ChatSession(model, load_tokenizer(ex), max_new_tokens=8, weights=quant.quantize(model, "int8"))
        assert out.getvalue() == s.reply("What does dumps do?") + "\n"


def test_serve_quantize_flag_gives_the_engine_int8_weights(export, monkeypatch):
    import uvicorn

    from palm.apps import openai_server

    made = {}

    class Engine:  # records what run() builds, decodes nothing
        def __init__(self, model, tokenizer, kind, **kw):
            made.update(kw, model=model)

    monkeypatch.setattr(openai_server, "Engine", Engine)
    monkeypatch.setattr(uvicorn, "run", lambda *a, **kw: None)
    p = argparse.ArgumentParser()
    openai_server.add_arguments(p)
    for flag, kind in (("int8", quant.Int8Weights), ("none", type(None))):
        assert openai_server.run(p.parse_args([str(export), "--quantize", flag])) == 0
        assert isinstance(made["weights"], kind)
        assert not any(t.requires_grad for t in made["model"].parameters())


def test_the_serve_engine_decodes_with_its_int8_weights(export):
    import threading

    from palm.apps.openai_server import Engine, Job
    from palm.model.export import load_model, load_tokenizer, read_export
    from palm.model.parallel import process_groups

    ex = read_export(export)
    with process_groups():
        model = load_model(ex).requires_grad_(False)
        tokenizer = load_tokenizer(ex)
        weights = quant.quantize(model, "int8")
        engine = Engine(model, tokenizer, ex.kind, weights=weights)
        prompt = engine.chat_ids([("user", "What does dumps do?")])
        events, done = [], threading.Event()

        def emit(event):
            events.append(event)
            if event[0] != "text":
                done.set()

        engine.submit(Job(prompt, 8, 0.0, None, engine.stop_ids(True), emit))
        assert done.wait(60) and events[-1][0] == "end", events
        text = "".join(e[1] for e in events if e[0] == "text")
        from palm.apps.chat import ChatSession

        assert text == ChatSession(model, tokenizer, max_new_tokens=8, weights=weights).reply("What does dumps do?")
