"""Native CPU kernels, compiled at first use with the machine's C compiler.

Three kernels, in ``decode.c``, for fp32 on CPU: the part of a decoding step between a block's
two matmuls (RoPE, the KV-cache write, multi-query attention, SwiGLU's product), used by
:class:`palm.decode.decoder.Decoder` through :class:`DecodeMix`; the greedy pick with its log-prob
(:func:`greedy`, used by :mod:`palm.decode.generate`); and the matmul of fp32 rows by int8
weights (:class:`Int8Linear`, used by :mod:`palm.decode.quant`). The torch operations they replace stay the
reference and the fallback: with no C compiler (or ``PALM_NATIVE=0``) decoding computes the same
function with them, only slower (``tests/test_native.py`` holds the two together).

Built once per source, compiler and CPU (``-march=native``: the key includes the CPU's flags, so
a home folder shared between machines never hands one a kernel for another's instructions;
``PALM_NATIVE_ARCH=x86-64-v3`` builds for AVX2 without AVX-512 instead, as an AVX2-only CPU
would: the benchmarks' emulation of one, beside torch's ``ATEN_CPU_CAPABILITY=avx2``) into
``$PALM_NATIVE_CACHE``, else ``$XDG_CACHE_HOME/palm-rlhf/native``, else ``~/.cache/...``, else
(no home folder known) ``$TMPDIR/palm-rlhf-<uid>``: about 0.5 s, once. A new folder is made
mode 0700. Written to a temporary name and renamed, so processes compiling at the same time
(the ranks of a torchrun) never load a half-written library.

Loading a library runs its code, so one is loaded only from a folder that belongs to this user
and that nobody else can write to, and only if the file itself is a regular file (not a symlink)
of this user that nobody else can write to (:func:`_unsafe`): a library another user planted
where this one looks (the temporary folder is shared) is never opened. A cache folder that fails
the check is not used: the kernel is built into a private temporary folder for this process
instead; an unsafe file in a safe folder is rebuilt over. Either way with one RuntimeWarning.

OpenMP: the library links ``libgomp.so.1``, the soname of the runtime torch's CPU build already
has loaded, so the dynamic loader hands it torch's: its parallel loops run on torch's thread pool,
with ``torch.set_num_threads``'s count, instead of a second pool of spinning threads.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("decode.c")
ABI = 4  # palm_decode_abi() of the signature the argtypes below describe (decode.c says the same)
# with -march=native first; plain -O3 where the compiler does not know it. -fno-trapping-math
# changes no result (IEEE arithmetic stays; only FP exceptions are assumed unobserved) and lets
# GCC turn the comparisons in exp_f32 and the max into vector selects: without it the SwiGLU
# and softmax loops stayed scalar (numbers:
# benchmarks/records/code-notes-2026-12-06.md#native-flags)
FLAG_SETS = (["-O3", "-march=native", "-fno-trapping-math", "-fopenmp"],
             ["-O3", "-fno-trapping-math", "-fopenmp"])
_LOCK = threading.Lock()
_LOADED: dict[tuple, ctypes.CDLL | None] = {}


def _cache_dir() -> Path:
    if os.environ.get("PALM_NATIVE_CACHE"):
        return Path(os.environ["PALM_NATIVE_CACHE"])
    try:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    except (RuntimeError, KeyError):  # no home folder known (HOME unset, no passwd entry)
        # the temporary folder is shared by every user: a folder of this user's own, made 0700
        # (one that someone else made first fails _unsafe, and a private folder is used instead)
        return Path(tempfile.gettempdir()) / f"palm-rlhf-{os.getuid()}"
    return Path(base) / "palm-rlhf" / "native"


def _unsafe(st: os.stat_result, directory: bool) -> str | None:
    """Why a library in this folder (``directory``), or this file, must not be loaded: it is not a
    folder / a regular file (a symlink: ``st`` is from ``lstat``), it belongs to another user, or
    a group or other users can write to it; ``None`` if it is safe."""
    uid = os.getuid()
    if not (stat.S_ISDIR(st.st_mode) if directory else stat.S_ISREG(st.st_mode)):
        return "not a folder" if directory else "not a regular file (a symlink?)"
    if st.st_uid != uid:
        return f"owned by uid {st.st_uid}, not by this user (uid {uid})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"writable by other users (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _cpu() -> str:
    """What ``-march=native`` depends on: the CPU's model and instruction flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() + platform.machine()
    keep = ("model name", "flags", "Features", "CPU part", "CPU implementer")
    return "\n".join(sorted({ln for ln in lines if ln.split(":")[0].strip() in keep}))


def _compile(cc: str, out: Path, flag_sets: tuple[list[str], ...]) -> str | None:
    """Build ``out`` from :data:`SOURCE` with the first of ``flag_sets`` the compiler takes;
    ``None`` on success, else why not (one line)."""
    why = f"no C compiler {cc!r} on PATH (set CC)"
    if shutil.which(cc) is None:
        return why
    for flags in flag_sets:
        try:
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        except OSError as e:
            return f"cannot write to {out.parent} ({e}; set PALM_NATIVE_CACHE to a writable folder)"
        os.close(fd)
        try:
            run = subprocess.run([cc, *flags, "-fPIC", "-shared", str(SOURCE), "-o", tmp, "-lm"],
                                 capture_output=True, text=True, timeout=120)
            if run.returncode == 0:
                # the linker gives the file the umask's mode (0775 under umask 002): this user's alone,
                # so it passes _unsafe
                os.chmod(tmp, 0o700)
                os.replace(tmp, out)
                return None
            why = f"{cc} {' '.join(flags)} failed: " + (run.stderr.strip().splitlines() or ["?"])[-1]
        except (OSError, subprocess.TimeoutExpired) as e:
            why = f"{cc} could not run: {e}"
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return why


def load(cc: str | None = None, portable: bool = False) -> ctypes.CDLL | None:
    """The compiled kernels (built on first use), or ``None`` (with one warning per process)
    where they cannot be had: ``PALM_NATIVE=0``, no compiler, a failed build. ``cc``: the
    compiler (default ``$CC``, else ``cc``); ``portable``: built without ``-march=native``, as
    where the compiler does not know it (the tests check that build too)."""
    env = os.environ
    if env.get("PALM_NATIVE", "1") == "0":
        return None
    cc = cc or env.get("CC") or "cc"
    # what the library's path depends on, from the environment alone: this runs at every
    # decoding step (the greedy pick), where building the path would cost more than the kernel
    arch = env.get("PALM_NATIVE_ARCH", "native")
    key = (cc, portable, arch, env.get("PALM_NATIVE_CACHE"), env.get("XDG_CACHE_HOME"), env.get("HOME"))
    if key in _LOADED:
        return _LOADED[key]
    with _LOCK:
        if key not in _LOADED:
            flags = tuple([f"-march={arch}" if f == "-march=native" else f for f in fs] for fs in FLAG_SETS)
            _LOADED[key] = _build_and_open(cc, flags[1:] if portable else flags)
        return _LOADED[key]


def _build_and_open(cc: str, flag_sets: tuple[list[str], ...]) -> ctypes.CDLL | None:
    version = ""
    if shutil.which(cc):
        version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    tag = hashlib.sha256("\0".join([SOURCE.read_text(), repr(flag_sets), version, _cpu(),
                                    platform.machine()]).encode()).hexdigest()[:16]
    folder, private, note = _cache_dir(), None, ""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder = folder.resolve()  # from here on the real folder: a symlink swapped later is not followed
        unsafe = _unsafe(os.lstat(folder), directory=True)
    except OSError as e:
        _fallback(f"cannot write to {folder} ({e}; set PALM_NATIVE_CACHE to a writable folder)")
        return None
    if unsafe:
        note = (f"{folder} is {unsafe}, so a library there could be someone else's: not loaded from it, "
                "the kernel is built for this process in a private folder instead (make the folder yours "
                "and writable by you alone, or set PALM_NATIVE_CACHE); ")
        private = folder = Path(tempfile.mkdtemp(prefix="palm-rlhf-native-"))  # 0700, this user's
    try:
        return _open(cc, folder / f"decode-{tag}.so", flag_sets, note)
    finally:
        if private is not None:  # the library stays mapped once loaded
            shutil.rmtree(private, ignore_errors=True)


def _open(cc: str, path: Path, flag_sets: tuple[list[str], ...], note: str) -> ctypes.CDLL | None:
    """Load ``path`` (in a folder that passed :func:`_unsafe`), built first where it is absent or
    is itself unsafe; ``None`` with one warning (``note`` first) where it cannot be had."""
    try:
        unsafe = _unsafe(os.lstat(path), directory=False)  # lstat: a symlink is not followed
    except FileNotFoundError:
        unsafe = "absent"
    if unsafe and unsafe != "absent":
        note += f"{path} is {unsafe}: not loaded, built again over it; "
    # a rebuild replaces an unsafe file by a rename (the folder is this user's alone)
    why = _compile(cc, path, flag_sets) if unsafe else None
    if why is None:
        try:
            lib = ctypes.CDLL(str(path))
            if lib.palm_decode_abi() == ABI:
                fn = lib.palm_decode_mix
                fn.restype = None
                fn.argtypes = ([ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_int64] * 4
                               + [ctypes.c_void_p] * 2 + [ctypes.c_int64] + [ctypes.c_void_p] * 2
                               + [ctypes.c_int64] * 2 + [ctypes.c_void_p, ctypes.c_int64]
                               + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p])
                lib.palm_greedy.restype = None
                lib.palm_greedy.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 2
                lib.palm_int8_linear.restype = None
                lib.palm_int8_linear.argtypes = ([ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 2
                                                 + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64])
                if note:
                    warnings.warn(f"palm.decode.native: {note.removesuffix('; ')}", RuntimeWarning, stacklevel=4)
                return lib
            why = f"{path} is another version of the kernel (delete it)"
        except (OSError, AttributeError) as e:
            why = f"could not load {path}: {e}"
    _fallback(note + why, stacklevel=5)
    return None


def _fallback(why: str, stacklevel: int = 4) -> None:
    warnings.warn(f"palm.decode.native: {why}; decoding runs on torch operations instead (the same "
                  "numbers, slower)", RuntimeWarning, stacklevel=stacklevel)


def greedy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The greedy pick of ``logits [b, V]`` (fp32 on CPU, unit stride along the vocabulary): the
    first index of each row's maximum ``[b]`` int64 and its log-probability under the row's
    softmax ``[b]``, in native passes over each row; ``None`` where the kernel does not apply (the
    caller then uses torch ops: :func:`palm.decode.generate.greedy_max` of the softmax)."""
    if logits.dtype != torch.float32 or logits.device.type != "cpu" or logits.dim() != 2 or logits.stride(-1) != 1:
        return None
    lib = load()
    if lib is None:
        return None
    b, v = logits.shape
    token, logp = torch.empty(b, dtype=torch.long), torch.empty(b)
    lib.palm_greedy(logits.data_ptr(), b, v, logits.stride(0), token.data_ptr(), logp.data_ptr())
    return token, logp


class Int8Linear:
    """``palm_int8_linear`` bound to one int8 weight ``q [n, k]`` (contiguous; ``k`` a multiple of
    16, at most 16384) and its fp32 scales ``[n]``: called with fp32 rows ``x [..., k]`` it
    returns ``x @ (q * scale[:, None]).T`` ``[..., n]``, reading each weight as one
    byte; each row of ``x`` is rounded to 14 bits on the way (decode.c says why and how exactly).
    Bound once, as a decoding step calls it twice per block: looking the library up and checking
    the weight at each call doubled its cost (numbers:
    benchmarks/records/code-notes-2026-12-06.md#int8-linear). Build it with :meth:`make`."""

    def __init__(self, lib: ctypes.CDLL, q: torch.Tensor, scale: torch.Tensor):
        self.fn, self.q, self.scale = lib.palm_int8_linear, q, scale  # the tensors kept alive
        self.n, self.k = q.shape
        self.q_ptr, self.scale_ptr = q.data_ptr(), scale.data_ptr()

    @staticmethod
    def make(q: torch.Tensor, scale: torch.Tensor, lib: ctypes.CDLL | None = None) -> "Int8Linear | None":
        """The kernel (``lib``, default :func:`load`'s) bound to ``q`` and ``scale``, or ``None``
        where it does not apply (another dtype or device, a shape it does not take, no compiled
        kernel): the caller then multiplies by the dequantized weight."""
        if (q.dtype != torch.int8 or scale.dtype != torch.float32 or q.device.type != "cpu" or q.dim() != 2
                or q.shape[1] % 16 or q.shape[1] > 16384 or not q.is_contiguous() or not scale.is_contiguous()):
            return None
        lib = lib or load()
        return None if lib is None else Int8Linear(lib, q, scale)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., k]`` fp32, contiguous, on CPU (checked by the caller: this runs a few times per
        block of every decoding step) -> ``[..., n]``."""
        k = x.shape[-1]
        assert k == self.k
        out = torch.empty(x.shape[:-1] + (self.n,))
        self.fn(x.data_ptr(), x.numel() // k, k, k, self.q_ptr, self.scale_ptr, self.n, out.data_ptr(), self.n)
        return out


class DecodeMix:
    """``palm_decode_mix`` bound to one decoder's KV cache and RoPE tables: called with a block's
    fused input projection ``y [b, 1, (h+2)*hd + 2f]`` of a one-token step, it fills that block's
    cache at position ``pos`` and returns ``[b, 1, h*hd + f]``, the attention output then
    ``silu(gate) * up``: what the block's fused output projection takes. The returned buffer is
    reused by the next call. Build it with :meth:`make`."""

    def __init__(self, lib: ctypes.CDLL, k: dict, v: dict, cos: torch.Tensor, sin: torch.Tensor,
                 key_bias: torch.Tensor | None, heads: int, ffn: int):
        self.fn, self.k, self.v, self.key_bias = lib.palm_decode_mix, k, v, key_bias
        first = next(iter(k.values()))
        b, max_len, hd = first.shape
        self.b, self.h, self.hd, self.f, self.max_len = b, heads, hd, ffn, max_len
        self.cos, self.sin = cos, sin  # [b or 1, max_len, 1, hd], contiguous (checked by make)
        self.cs_row = cos.stride(0) if cos.shape[0] > 1 else 0
        hp = (heads + 3) // 4 * 4  # the kernel takes heads 4 at a time
        self.scratch = torch.empty(b, hp * hd + hp * max_len)
        self.out = torch.empty(b, 1, heads * hd + ffn)
        self.ptrs = {layer: (k[layer].data_ptr(), v[layer].data_ptr()) for layer in k}

    @staticmethod
    def make(k: dict, v: dict, cos: torch.Tensor, sin: torch.Tensor, key_bias: torch.Tensor | None,
             heads: int, ffn: int, lib: ctypes.CDLL | None = None) -> "DecodeMix | None":
        """The kernel (``lib``, default :func:`load`'s) bound to this cache, or ``None`` where it
        does not apply (not fp32 on CPU, a layout it does not take, no compiled kernel): the
        caller then uses torch ops."""
        tensors = [*k.values(), *v.values(), cos, sin] + ([key_bias] if key_bias is not None else [])
        if not all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in tensors):
            return None
        lib = lib or load()
        return None if lib is None else DecodeMix(lib, k, v, cos, sin, key_bias, heads, ffn)

    def __call__(self, y: torch.Tensor, layer: int, pos: int) -> torch.Tensor:
        b, s, width = y.shape
        assert s == 1 and b == self.b and pos < self.max_len and y.dtype == torch.float32
        assert width == (self.h + 2) * self.hd + 2 * self.f
        y = y.contiguous()  # a no-op for what the weights return
        kp, vp = self.ptrs[layer]
        bias = self.key_bias
        self.fn(y.data_ptr(), y.stride(0), b, self.h, self.hd, self.f,
                self.cos.data_ptr() + 4 * pos * self.cos.stride(1), self.sin.data_ptr() + 4 * pos * self.sin.stride(1), self.cs_row,
                kp, vp, self.max_len * self.hd, pos,
                None if bias is None else bias.data_ptr(), 0 if bias is None else bias.stride(0),
                self.scratch.data_ptr(), self.scratch.stride(0), self.out.data_ptr())
        return self.out
