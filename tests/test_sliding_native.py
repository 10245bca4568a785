"""The fused C banded kernel (``attention_sliding_native.py``) against the dense reference and the torch path: random
sizes, windows, dilations, padding, global tokens, sinks, ALiBi, dropout (against the reference with the same mask),
batch > 1, strided inputs, one or more threads, a forked child; a model loaded with trust_remote_code; and its
loader's fallbacks."""

from __future__ import annotations

import ctypes
import mmap

import numpy as np
import pytest
import torch

import hf_xarch.model.attention_sliding_kernels as kernels
import hf_xarch.model.attention_sliding_native as native

from .test_sliding_kernels import banded, random_case, reference

pytestmark = pytest.mark.skipif(native.native_kernel() is None,
                                reason=f"no native banded kernel here: {native.native_kernel_error()}")


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls that took the native kernel (so that a test cannot pass on the torch path)."""
    count = {"native": 0}
    original = kernels.native_banded_attention

    def counting(*args):
        count["native"] += 1
        return original(*args)

    monkeypatch.setattr(kernels, "native_banded_attention", counting)
    return count


def as_float32(case):
    out = dict(case)
    for name in "qkv":
        out[name] = case[name].detach().float().requires_grad_()
    if case["slopes"] is not None:
        out["slopes"] = case["slopes"].float()
    return out


def grads(out, case, weight):
    return torch.autograd.grad(out, (case["q"], case["k"], case["v"]), weight)


@pytest.mark.parametrize("seed", range(24))
def test_native_equals_dense_reference_forward_and_backward(seed, calls):
    """float32 kernel against the float64 dense reference on the same numbers: outputs and all three gradients."""
    case = random_case(5000 + seed + int(torch.randint(0, 10**6, (1,))))
    case32 = as_float32(case)
    out, ref = banded(case32), reference(case)
    assert calls["native"] >= 1
    real = case["valid"][:, None, :, None]  # rows of padding queries are unspecified
    assert ((out.double() - ref) * real).abs().max() < 2e-5
    weight = torch.randn(out.shape, dtype=torch.float64) * real
    for got, want in zip(grads(out, case32, weight.float()), grads(ref, case, weight)):
        assert (got.double() - want).abs().max() < 5e-5 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("threads", [1, 2])
def test_native_equals_torch_path_at_a_realistic_shape(threads, calls):
    """Batch 2, GQA, a (B, N, H, D) projection layout (strided rows), padding, global tokens, ALiBi, a partial last
    block: the native kernel and ``_BandedCore`` agree to float32 rounding, on one thread or several."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(11)
        n, heads, dim = 333, 4, 32
        q = torch.randn(2, n, heads, dim, generator=gen).transpose(1, 2).requires_grad_()
        k, v = (torch.randn(2, 2, n, dim, generator=gen).requires_grad_() for _ in range(2))
        valid = torch.arange(n)[None] < torch.tensor([[n], [250]])
        global_keys = torch.zeros(2, n, dtype=torch.bool).index_fill(1, torch.tensor([0, 7, 200]), True)
        slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
        args = (q, k, v, 48, 48, [1, 1, 2, 1], 0.17, valid, global_keys, None, slopes)
        fast = kernels.banded_attention(*args)
        plain = kernels.banded_attention(*args, native=False)
        assert calls["native"] >= 1
        real = valid[:, None, :, None]
        assert ((fast - plain) * real).abs().max() < 1e-5
        weight = torch.randn(fast.shape, generator=gen) * real
        for a, b in zip(torch.autograd.grad(fast, (q, k, v), weight), torch.autograd.grad(plain, (q, k, v), weight)):
            assert (a - b).abs().max() < 1e-4
    finally:
        torch.set_num_threads(previous)


def test_native_is_deterministic_across_thread_counts():
    """Heads run on different threads, but each head's sums run in one fixed order: bit-identical results."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 200, 16, generator=gen).requires_grad_() for _ in range(3))
    results = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out = kernels.banded_attention(q, k, v, 20, 20, [1, 1, 1], 0.25)
            results.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v))))
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("n, left, right, block", [(1, 4, 4, None), (5, 16, 16, 8), (40, 3, 0, 4), (64, 63, 0, 16),
                                                   (70, 100, 100, 32), (701, 8, 8, None), (517, 5, 0, 4)])
def test_native_at_the_edges(n, left, right, block, calls):
    """A single token, windows longer than the sequence, causal windows, partial blocks: every window that reaches
    past an end is cut there. And sequences many windows long, whose buffers of transposed keys and values move
    their columns to the front many times."""
    gen = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(1, 2, n, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    case = {"q": q.requires_grad_(), "k": k.requires_grad_(), "v": v.requires_grad_(), "left": left, "right": right,
            "dilation": [1, 1], "valid": torch.ones(1, n, dtype=torch.bool), "global_keys": None, "sink_keys": None,
            "slopes": None, "block": block}
    case32 = as_float32(case)
    out, ref = banded(case32), reference(case)
    assert calls["native"] == 1
    assert (out.double() - ref).abs().max() < 2e-6
    weight = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    for got, want in zip(grads(out, case32, weight.float()), grads(ref, case, weight)):
        assert (got.double() - want).abs().max() < 2e-5


def test_torch_path_runs_where_the_native_kernel_cannot(calls):
    """float64 or native=False take ``_BandedCore``."""
    case = random_case(9)
    banded(case)
    banded(as_float32(case), native=False)
    assert calls["native"] == 0
    assert not native.native_supported(case["q"]) and native.native_supported(case["q"].float())


def keep_mask(seed: int, stream: int, queries: np.ndarray, keys: np.ndarray, p: float) -> np.ndarray:
    """The C kernel's dropout rule, written again with numpy's wrapping uint32 arithmetic: (queries, keys) bool."""
    u32 = np.uint32

    def mix(x):
        x = x ^ (x >> u32(16))
        x = x * u32(0x7FEB352D)
        x = x ^ (x >> u32(15))
        x = x * u32(0x846CA68B)
        return x ^ (x >> u32(16))

    with np.errstate(over="ignore"):
        inner = mix(u32(stream) ^ mix(queries.astype(np.uint32)))
        row = mix(u32(seed & 0xFFFFFFFF) ^ mix(u32(seed >> 32) ^ inner))
        hashed = mix(row[:, None] ^ (keys.astype(np.uint32)[None, :] * u32(0x9E3779B9)))
    return hashed >= u32(int(p * 2**32))


@pytest.mark.parametrize("seed", range(6))
def test_native_dropout_equals_the_reference_with_the_same_mask(seed, calls):
    """Dropout (p = 0.3) against the dense float64 reference whose weights are masked with ``keep_mask`` (a band key
    named by its slot, the g-th global token or sink by 2^31 + g): output and gradients. The backward draws the
    forward's mask again, so the gradients are exact for it."""
    p = 0.3
    case = random_case(7000 + seed)
    heads = case["q"].shape[1]
    case["dilation"] = [1] * heads  # one kernel call for all heads: streams are batch row * heads + head
    case32 = as_float32(case)
    torch.manual_seed(seed)
    call_seed = int(torch.randint(0, 2**62, (1,)).item())  # what banded_attention draws
    torch.manual_seed(seed)
    out = banded(case32, dropout=p)
    assert calls["native"] == 1

    n = case["q"].shape[2]
    extras = kernels.extra_key_slots(case["global_keys"], case["sink_keys"])
    mask = torch.zeros(case["q"].shape[0], heads, n, n, dtype=torch.bool)
    for b in range(case["q"].shape[0]):
        names = np.arange(n, dtype=np.int64)
        if extras is not None:
            slots, present = extras[0][b], extras[1][b]
            for g in range(slots.shape[0]):
                if present[g]:
                    names[int(slots[g])] = 2**31 + g
        for h in range(heads):
            mask[b, h] = torch.from_numpy(keep_mask(call_seed, b * heads + h, np.arange(n), names, p))
    slots = torch.arange(n)
    visible = kernels.sliding_visibility(slots, slots, case["left"], case["right"], torch.tensor(case["dilation"]),
                                         case["valid"], case["global_keys"], case["sink_keys"])
    bias = kernels.alibi_bias(case["slopes"], slots, slots) if case["slopes"] is not None else None
    weights = kernels.dense_sliding_attention(case["q"], case["k"], case["v"], visible, 0.3, bias)[1]
    ref = torch.matmul(weights * mask / (1 - p), kernels.repeat_heads(case["v"], heads))

    real = case["valid"][:, None, :, None]
    assert ((out.double() - ref) * real).abs().max() < 2e-5
    weight = torch.randn(out.shape, dtype=torch.float64) * real
    for got, want in zip(grads(out, case32, weight.float()), grads(ref, case, weight)):
        assert (got.double() - want).abs().max() < 5e-5 * max(1.0, want.abs().max().item())


def test_native_dropout_drops_at_its_rate_and_differs_per_call():
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 4, 600, 16, generator=gen) for _ in range(3))
    kept = keep_mask(123456789123, 3, np.arange(600), np.arange(600), 0.3)
    assert abs(kept.mean() - 0.7) < 0.01
    first = kernels.banded_attention(q, k, v, 32, 32, [1] * 4, 0.25, dropout=0.3)
    second = kernels.banded_attention(q, k, v, 32, 32, [1] * 4, 0.25, dropout=0.3)
    plain = kernels.banded_attention(q, k, v, 32, 32, [1] * 4, 0.25)
    assert not torch.allclose(first, second) and not torch.allclose(first, plain)
    # the mean over dropout draws approaches the plain output (dropout is unbiased)
    mean = torch.stack([kernels.banded_attention(q, k, v, 32, 32, [1] * 4, 0.25, dropout=0.3) for _ in range(40)])
    assert (mean.mean(0) - plain).abs().mean() < 0.25 * (first - plain).abs().mean()


def test_loader_falls_back_with_a_reason(monkeypatch, tmp_path):
    monkeypatch.setenv(native.DISABLE_ENV, "0")
    library, reason = native._load()
    assert library is None and native.DISABLE_ENV in reason
    monkeypatch.delenv(native.DISABLE_ENV)
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that fails
    library, reason = native._load()
    assert library is None and "compiling the kernel failed" in reason
    assert not list(tmp_path.glob("*.so"))


def test_loader_builds_into_the_cache_and_reuses_it(monkeypatch, tmp_path):
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path))
    library, reason = native._load()
    assert reason is None and library is not None
    built = list(tmp_path.glob("banded_kernel_*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    assert native._load()[1] is None
    assert built[0].stat().st_mtime_ns == stamp  # found, not rebuilt


def test_a_model_loaded_with_trust_remote_code_runs_the_same_native_kernel(tmp_path):
    """The C source travels inside the saved Python files: in a Python without hf_xarch, the loaded model compiles
    and runs the same kernel, and its outputs are bit-identical."""
    from hf_xarch import XArchModel

    from .helpers import random_ids, run_without_hf_xarch, tiny_config

    model = XArchModel(tiny_config(attention_type="sliding_window", attention_window=6)).eval()
    ids = random_ids(2, 23, seed=4)
    with torch.no_grad():
        expected = model(ids).last_hidden_state
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    assert (folder / "attention_sliding_native.py").exists()
    torch.save({"ids": ids, "expected": expected}, tmp_path / "io.pt")
    script = f"""
import sys, torch
from transformers import AutoModel
model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
native = sys.modules[type(model).__module__.rsplit(".", 1)[0] + ".attention_sliding_native"]
assert native.native_kernel() is not None, native.native_kernel_error()
data = torch.load({str(tmp_path / "io.pt")!r})
with torch.no_grad():
    out = model(data["ids"]).last_hidden_state
assert torch.equal(out, data["expected"]), (out - data["expected"]).abs().max()
print("same kernel, same outputs")
"""
    result = run_without_hf_xarch(script)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "same kernel, same outputs" in result.stdout


def test_native_takes_any_stride_on_a_length_one_axis(calls):
    """A single token may come with any stride on its row axis (here 1 < D), which BLAS would refuse as a leading
    dimension; the kernel still sees valid ones. One key: the output is its value, the query gets no gradient."""
    q = torch.randn(2, 3, 8).as_strided((2, 3, 1, 8), (24, 8, 1, 1)).requires_grad_()
    k = torch.randn(2, 3, 8).as_strided((2, 3, 1, 8), (24, 8, 1, 1)).requires_grad_()
    v = torch.randn(2, 3, 1, 8).requires_grad_()
    out = kernels.banded_attention(q, k, v, 4, 4, [1, 1, 1], 0.3)
    assert calls["native"] == 1
    assert torch.equal(out, v)
    dq, dk, dv = torch.autograd.grad(out.square().sum(), (q, k, v))
    assert torch.equal(dq, torch.zeros_like(q)) and torch.equal(dk, torch.zeros_like(k))
    assert torch.allclose(dv, 2 * v)


@pytest.mark.parametrize("layout", ["broadcast", "every other column", "overlapping rows"])
def test_native_backward_reads_a_gradient_blas_cannot_take_in_place(layout, calls, monkeypatch):
    """An upstream gradient whose rows BLAS cannot take (the broadcast one of ``.sum()``, a view of every other
    column, rows closer than D) is gathered block by block inside the kernel: the gradients equal those from the
    same numbers laid out densely, with global tokens (the extra keys' matmuls read it too), GQA and batch 2."""
    gathered = []
    blas_rows = kernels._blas_rows
    monkeypatch.setattr(kernels, "_blas_rows", lambda x: gathered.append(not blas_rows(x)) or blas_rows(x))
    gen = torch.Generator().manual_seed(int(torch.randint(0, 10**6, (1,))))
    n, heads, dim = 157, 4, 16
    q = torch.randn(2, heads, n, dim, generator=gen).requires_grad_()
    k, v = (torch.randn(2, 2, n, dim, generator=gen).requires_grad_() for _ in range(2))
    global_keys = torch.zeros(2, n, dtype=torch.bool).index_fill(1, torch.tensor([3, 90]), True)
    out = kernels.banded_attention(q, k, v, 20, 11, [1] * heads, 0.25, None, global_keys)
    if layout == "broadcast":
        weight = torch.randn((), generator=gen).expand(out.shape)
    elif layout == "every other column":
        weight = torch.randn(2, heads, n, 2 * dim, generator=gen)[..., ::2]
    else:  # row r holds columns r ... r + D - 1 of one long strip: rows 1 apart
        weight = torch.randn(2 * heads * n + dim, generator=gen).as_strided(out.shape, (heads * n, n, 1, 1))
    assert not kernels._blas_rows(weight)
    gathered.clear()
    got = torch.autograd.grad(out, (q, k, v), weight, retain_graph=True)
    assert calls["native"] == 1 and gathered == [True]
    want = torch.autograd.grad(out, (q, k, v), weight.contiguous())
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_native_threads_work_in_a_forked_child():
    """A child forked after the thread pool started (torch.multiprocessing with fork, say) gets a pool of its own
    instead of waiting forever on threads it did not inherit."""
    import multiprocessing

    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gen = torch.Generator().manual_seed(8)
        q, k, v = (torch.randn(1, 4, 64, 8, generator=gen) for _ in range(3))
        expected = kernels.banded_attention(q, k, v, 8, 8, [1] * 4, 0.3)  # starts the pool here
        context = multiprocessing.get_context("fork")
        with context.Pool(1) as children:
            got = children.apply_async(_banded_in_child, (q, k, v)).get(timeout=120)
        assert torch.equal(got, expected)
    finally:
        torch.set_num_threads(previous)


def _banded_in_child(q, k, v):
    torch.set_num_threads(2)
    return kernels.banded_attention(q, k, v, 8, 8, [1] * 4, 0.3)


def test_loader_builds_in_the_temporary_directory_when_the_cache_is_not_writable(monkeypatch, tmp_path):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder should be")  # mkdir fails
    monkeypatch.setenv(native.CACHE_ENV, str(blocked / "kernels"))
    monkeypatch.setattr(native.tempfile, "gettempdir", lambda: str(tmp_path))
    library, reason = native._load()
    assert reason is None and library is not None
    assert len(list(tmp_path.glob("hf_xarch_kernels_*/banded_kernel_*.so"))) == 1


def test_the_kernels_exp_is_within_one_ulp():
    """The kernel's own vectorised exp (softmax arguments, x <= 0) against float64's, over its whole range: within
    1 ulp of the exact value (plus float64's own rounding), exp(0) = 1, and 0 below the smallest normal float."""
    library = native.native_kernel()
    x = torch.cat([torch.linspace(-87.3, 0.0, 2_000_001), -20 * torch.rand(500_000, generator=torch.Generator()
                                                                           .manual_seed(0))])
    y = torch.empty_like(x)
    library.xarch_exp_nonpositive(ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(y.data_ptr()),
                                  ctypes.c_int64(x.numel()))
    exact = x.double().exp()
    ulp = torch.from_numpy(np.spacing(exact.float().numpy())).double()
    assert ((y.double() - exact).abs() / ulp).max() <= 1.02
    edges = torch.tensor([0.0, -87.4, -100.0, -1e30])
    out = torch.empty_like(edges)
    library.xarch_exp_nonpositive(ctypes.c_void_p(edges.data_ptr()), ctypes.c_void_p(out.data_ptr()),
                                  ctypes.c_int64(4))
    assert out.tolist() == [1.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("rows, cols", [(16, 16), (32, 64), (45, 64), (37, 19), (5, 3), (64, 48)])
def test_the_kernels_transpose_equals_torchs(rows, cols):
    """The kernel's transpose (AVX-512 tiles where the CPU has them, element by element for the rest) on a strided
    source into a strided destination: equal to torch's, and nothing outside the destination's rows is written."""
    gen = torch.Generator().manual_seed(rows * 100 + cols)
    source = torch.randn(rows, cols + 7, generator=gen)[:, 3 : 3 + cols]  # row stride cols + 7
    destination = torch.full((cols, rows + 21), -1.0)  # row stride rows + 21
    native.native_kernel().xarch_transpose(
        ctypes.c_void_p(source.data_ptr()), ctypes.c_int64(rows), ctypes.c_int64(cols), ctypes.c_int64(cols + 7),
        ctypes.c_void_p(destination.data_ptr()), ctypes.c_int64(rows + 21))
    assert torch.equal(destination[:, :rows], source.t())
    assert (destination[:, rows:] == -1).all()


def _resident_pages(address: int, size: int) -> int:
    """How many pages of [address, address + size) (page-aligned) are resident, from mincore(2)."""
    libc = ctypes.CDLL(None, use_errno=True)
    vector = (ctypes.c_ubyte * (size // mmap.PAGESIZE))()
    assert libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), vector) == 0, ctypes.get_errno()
    return sum(byte & 1 for byte in vector)


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="MADV_POPULATE_WRITE is Linux's")
def test_prefault_makes_every_page_of_an_output_resident(monkeypatch):
    """``prefault`` faults in every whole page of a range at once (here a fresh anonymous mapping, none of whose
    pages is resident before; a range that starts and ends mid-page keeps its partial pages out), and both passes
    hand it their outputs."""
    pages = 64
    fresh = mmap.mmap(-1, pages * mmap.PAGESIZE)
    address = ctypes.addressof(ctypes.c_char.from_buffer(fresh))
    assert _resident_pages(address, pages * mmap.PAGESIZE) == 0
    start, size = address + 100, (pages - 1) * mmap.PAGESIZE  # pages 1 ... pages - 2 lie wholly inside
    if native.native_kernel().xarch_prefault(ctypes.c_void_p(start), ctypes.c_int64(size)) != 0:
        pytest.skip("this Linux kernel refuses MADV_POPULATE_WRITE (before 5.14)")
    assert _resident_pages(address, mmap.PAGESIZE) == 0
    assert _resident_pages(address + mmap.PAGESIZE, (pages - 2) * mmap.PAGESIZE) == pages - 2
    assert _resident_pages(address + (pages - 1) * mmap.PAGESIZE, mmap.PAGESIZE) == 0

    handed = []
    monkeypatch.setattr(kernels, "prefault", lambda *tensors: handed.extend(t.shape for t in tensors))
    q, k, v = (torch.randn(2, 3, 50, 8).requires_grad_() for _ in range(3))
    kernels.banded_attention(q, k, v, 5, 5, [1, 1, 1], 0.3).sum().backward()
    assert handed == [q.shape] * 4  # the output, then the three gradients
