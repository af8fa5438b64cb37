"""The native decoding kernel (palm/decode/native/decode.c) against the torch operations it replaces
(``Decoder._mix``), and the decoder's fallback to those operations where there is no kernel.

Both builds are checked: with ``-march=native`` (what decoding loads) and the portable one (what
a compiler without ``-march=native`` gives), each through its blocked loops (head_dim a multiple
of 16, heads 4 at a time, a group padded with zero heads) and its plain loops (other head_dims),
on a left-padded batch (per-row RoPE tables and key mask) and on equal-length prompts (one table
for every row, no mask). Tolerance: 1e-5 relative to the largest logit (fp32; the kernel sums
in another order than torch's GEMMs and uses its own exp, within 2 ulp).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import redraw_weights

from palm.decode import layouts, native
from palm.decode.cache import new_cache
from palm.decode.decoder import Decoder
from palm.decode.generate import generate, left_pad
from palm.model import parallel
from palm.model.network import ModelConfig, PaLM

CONFIGS = {
    "4 heads of 16 (blocked)": dict(n_heads=4, head_dim=16),
    "3 heads of 32 (blocked, a zero head)": dict(n_heads=3, head_dim=32),
    "5 heads of 8 (plain loops)": dict(n_heads=5, head_dim=8),
}
BATCHES = {"left-padded": (7, 2, 5, 1), "equal lengths": (4, 4, 4)}
STEPS = 10


@pytest.fixture(scope="module", autouse=True)
def dist():
    parallel.init_distributed()
    yield
    parallel.teardown()


@pytest.fixture(scope="module", params=["native", "portable"])
def lib(request):
    lib = native.load(portable=request.param == "portable")
    if lib is None:
        pytest.skip("no compiled kernel here (no C compiler, or PALM_NATIVE=0): decoding uses torch ops")
    return lib


def make_model(shape: dict) -> PaLM:
    cfg = ModelConfig(vocab_size=200, d_model=48, n_layers=2, ffn_mult=2.5, seq_len=32, **shape)
    model = PaLM(cfg, seed=5).eval()
    redraw_weights(model, seed=77)
    return model


def decode(model: PaLM, lengths: tuple[int, ...], lib) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits of a prompt pass then ``STEPS`` one-token steps (fixed random tokens fed, so both
    paths see the same inputs) ``[STEPS + 1, b, V]``, and the first layer's cached keys and the
    last layer's values, decoding with ``lib``'s kernel (``None``: the torch ops)."""
    g = torch.Generator().manual_seed(sum(lengths))
    prompts = [torch.randint(0, 200, (n,), generator=g) for n in lengths]
    width = max(lengths)
    prompt, pad = left_pad(prompts, 0, width, torch.device("cpu"))
    feed = torch.randint(0, 200, (len(lengths), STEPS, 1), generator=g)
    dec = Decoder(model, new_cache(model, len(lengths), width + STEPS, pad, dtype=torch.float32))
    heads, ffn = model.cfg.n_heads, model.layers["0"].mlp.gate.weight.shape[0]
    dec.mix = None if lib is None else native.DecodeMix.make(
        dec.cache.k, dec.cache.v, dec.cos, dec.sin, dec.cache.key_bias, heads, ffn, lib=lib)
    assert lib is None or dec.mix is not None
    logits = [dec(prompt)] + [dec(feed[:, i]) for i in range(STEPS)]
    first, *_, last = dec.cache.k
    return torch.stack(logits), dec.cache.k[first].clone(), dec.cache.v[last].clone()


@pytest.mark.parametrize("batch", BATCHES, ids=list(BATCHES))
@pytest.mark.parametrize("shape", CONFIGS, ids=list(CONFIGS))
def test_the_kernel_equals_the_torch_ops(lib, shape, batch):
    model = make_model(CONFIGS[shape])
    ours, k, v = decode(model, BATCHES[batch], lib)
    ref, k_ref, v_ref = decode(model, BATCHES[batch], None)
    scale = ref.abs().max().item()
    assert (ours - ref).abs().max().item() <= 1e-5 * max(1.0, scale)
    assert torch.allclose(k, k_ref, atol=1e-6) and torch.allclose(v, v_ref, atol=1e-6)
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_the_decoder_uses_the_kernel_for_fp32_on_cpu_only(lib):
    model = make_model(CONFIGS["4 heads of 16 (blocked)"])
    assert Decoder(model, new_cache(model, 2, 8, dtype=torch.float32)).mix is not None
    half = make_model(CONFIGS["4 heads of 16 (blocked)"]).to(torch.bfloat16)
    assert Decoder(half, new_cache(half, 2, 8, dtype=torch.bfloat16),
                   layouts.DecodePlan(torch.bfloat16)).mix is None


def test_without_the_kernel_decoding_is_the_same_function(monkeypatch):
    """``PALM_NATIVE=0`` (as on a machine without a C compiler): the torch ops, the same tokens."""
    model = make_model(CONFIGS["3 heads of 32 (blocked, a zero head)"])
    prompts = [torch.tensor([5, 6, 7]), torch.tensor([9])]
    with_kernel = generate(model, prompts, 8)
    monkeypatch.setenv("PALM_NATIVE", "0")
    assert native.load() is None
    assert Decoder(model, new_cache(model, 2, 8, dtype=torch.float32)).mix is None
    without = generate(model, prompts, 8)
    assert torch.equal(with_kernel.tokens, without.tokens)
    assert torch.allclose(with_kernel.raw_logprobs, without.raw_logprobs, atol=1e-5)


@pytest.mark.parametrize("cc", ["no-such-compiler", "false"], ids=["missing", "failing"])
def test_no_compiler_or_a_failed_build_warns_once_and_gives_none(cc, tmp_path, monkeypatch):
    monkeypatch.setenv("PALM_NATIVE_CACHE", str(tmp_path / "cache"))
    with pytest.warns(RuntimeWarning, match=f"{cc}.*decoding runs on torch operations"):
        assert native.load(cc=cc) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process: the second call is silent
        assert native.load(cc=cc) is None
    assert not list((tmp_path / "cache").glob("*"))  # nothing half-written left behind


def test_a_build_is_written_whole_and_reused(tmp_path, monkeypatch):
    if native.load() is None:
        pytest.skip("no compiled kernel here (no C compiler, or PALM_NATIVE=0)")
    monkeypatch.setenv("PALM_NATIVE_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_LOADED", {})
    assert native.load() is not None
    built = sorted(p.name for p in tmp_path.iterdir())
    assert len(built) == 1 and built[0].startswith("decode-") and built[0].endswith(".so")  # no temp files
    calls = []
    monkeypatch.setattr(native, "_compile", lambda *a: calls.append(a))
    monkeypatch.setattr(native, "_LOADED", {})  # a new process
    assert native.load() is not None and calls == []


def test_an_unwritable_cache_folder_warns_and_gives_none(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("PALM_NATIVE_CACHE", str(blocker / "native"))
    with pytest.warns(RuntimeWarning, match="PALM_NATIVE_CACHE"):
        assert native.load() is None


@pytest.mark.parametrize("rows, vocab", [(16, 8192), (1, 8192), (3, 1000)])
def test_the_greedy_pick_is_the_first_maximum_and_its_log_softmax(lib, rows, vocab, monkeypatch):
    """Against ``max`` (its first index) and ``log_softmax``, on rows with the maximum tied
    within a block of 64 and across blocks, in the last block only, and beside -inf entries;
    through ``generate``'s own path too (``native.greedy``, strided rows of a wider buffer)."""
    g = torch.Generator().manual_seed(rows + vocab)
    x = torch.randn(rows, vocab + 8, generator=g)[:, :vocab] * 4  # rows of a wider buffer
    x[0, [5, 9, 700]] = 30.0  # ties within a block and across blocks: the first wins
    x[-1, -1] = 40.0  # the maximum alone in the last (partial) block
    if rows > 2:
        x[1, ::3] = float("-inf")
        x[1, [301, 302]] = 25.0
    token, logp = torch.empty(rows, dtype=torch.long), torch.empty(rows)
    lib.palm_greedy(x.data_ptr(), rows, vocab, x.stride(0), token.data_ptr(), logp.data_ptr())
    want = x.max(dim=-1).indices
    assert torch.equal(token, want)
    assert torch.allclose(logp, x.log_softmax(-1).gather(-1, want[:, None])[:, 0], atol=1e-5)
    monkeypatch.setattr(native, "load", lambda *a, **k: lib)
    picked = native.greedy(x)
    assert picked is not None and torch.equal(picked[0], want) and torch.equal(picked[1], logp)
    assert native.greedy(x.double()) is None and native.greedy(x.t()) is None  # torch ops then
