"""The native banded kernel as the custom op ``hf_xarch::sliding_window_attention``: its C source compiles with
warnings as errors, the op passes torch's own op checks (schema, fake implementation, autograd), ``torch.compile``
takes a sliding-window model whole (``fullgraph=True``) and ``torch.export`` traces one; a missing C source falls back
to the torch path with the reason."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

import hf_xarch.model.attention_sliding_kernels as kernels
import hf_xarch.model.attention_sliding_native as native
from hf_xarch import XArchModel

from .helpers import random_ids, tiny_config

needs_kernel = pytest.mark.skipif(native.native_kernel() is None,
                                  reason=f"no native banded kernel here: {native.native_kernel_error()}")


def test_the_c_source_compiles_with_warnings_as_errors(tmp_path):
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        pytest.skip("no C compiler")
    command = [compiler, *native.COMPILE_FLAGS, "-Wall", "-Wextra", "-Werror", str(native.kernel_source()), "-o",
               str(tmp_path / "kernel.so")]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_a_missing_c_source_falls_back_with_the_reason_until_one_is_handed_over(monkeypatch, tmp_path):
    """Code loaded with trust_remote_code from a folder saved without the .c: no kernel, a reason naming the file,
    and the torch path's outputs; ``use_kernel_source`` (what from_pretrained calls) makes the next call retry."""
    monkeypatch.setattr(native, "_KERNEL", [])
    monkeypatch.setattr(native, "_SOURCE", [tmp_path / native.KERNEL_FILE])
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path / "cache"))
    assert native.native_kernel() is None
    assert native.KERNEL_FILE in native.native_kernel_error() and "missing" in native.native_kernel_error()
    q, k, v = (torch.randn(1, 2, 40, 8) for _ in range(3))
    expected = kernels.banded_attention(q, k, v, 5, 0, [1, 1], 0.3, native=False)
    assert torch.equal(kernels.banded_attention(q, k, v, 5, 0, [1, 1], 0.3), expected)
    if shutil.which("cc") or shutil.which("gcc") or shutil.which("clang"):
        shutil.copyfile(native._BESIDE, tmp_path / "saved.c")
        native.use_kernel_source(tmp_path / "saved.c")
        assert native.native_kernel() is not None, native.native_kernel_error()


def _op_arguments(**options):
    """The arguments ``banded_attention`` hands the op, for q, k, v requiring grad (GQA, a strided query layout,
    padding, optionally global tokens and ALiBi)."""
    recorded = []
    gen = torch.Generator().manual_seed(3)
    n, heads, dim = 70, 4, 8
    q = torch.randn(2, n, heads, dim, generator=gen).transpose(1, 2).requires_grad_()
    k, v = (torch.randn(2, 2, n, dim, generator=gen).requires_grad_() for _ in range(2))
    valid = torch.arange(n)[None] < torch.tensor([[n], [50]])
    original = kernels.native_banded_attention
    kernels.native_banded_attention = lambda *args: recorded.append(args) or original(*args)
    try:
        kernels.banded_attention(q, k, v, 9, 4, [1] * heads, 0.35, valid, **options)
    finally:
        kernels.native_banded_attention = original
    (args,) = recorded
    # leaves (same strides), so that each of opcheck's backward passes has a graph of its own
    return tuple(a.detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args)


@needs_kernel
@pytest.mark.parametrize("extras", [False, True], ids=["band only", "global tokens and ALiBi"])
def test_the_op_passes_torchs_op_checks(extras):
    """``torch.library.opcheck``: the schema, the fake implementation against the real outputs' shapes and strides,
    the registered autograd, and AOT dispatch (what torch.compile and torch.export run)."""
    options = {}
    if extras:
        options = dict(global_keys=torch.zeros(2, 70, dtype=torch.bool).index_fill(1, torch.tensor([2, 40]), True),
                       alibi_slopes=torch.tensor([0.5, 0.25, 0.125, 0.0625]))
    args = _op_arguments(**options)
    assert args[3].shape[2] == (2 if extras else 0)  # the extra keys reached the op
    torch.library.opcheck(torch.ops.hf_xarch.sliding_window_attention.default, args)


def _sliding_model():
    return XArchModel(tiny_config(attention_type="sliding_window", attention_window=6)), random_ids(2, 23, seed=4)


@needs_kernel
def test_torch_compile_takes_a_sliding_window_model_whole_and_matches_eager():
    """``fullgraph=True`` (no graph break anywhere, the kernel included), forward and backward, against eager. The
    aot_eager backend traces exactly what inductor would (dynamo, then AOT autograd on fake tensors: the op's fake
    implementation and its registered backward) without inductor's code generation."""
    torch.manual_seed(0)
    model, ids = _sliding_model()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    out = compiled(ids).last_hidden_state
    expected = model(ids).last_hidden_state
    assert counter.frame_count == 1
    assert any("sliding_window_attention" in str(node.target) for graph in counter.graphs for node in graph.graph.nodes)
    assert torch.allclose(out, expected, atol=1e-6, rtol=1e-5)
    weight = torch.randn(out.shape)
    got = torch.autograd.grad(out, list(model.parameters()), weight)
    want = torch.autograd.grad(expected, list(model.parameters()), weight)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


@needs_kernel
@pytest.mark.slow
def test_inductor_compiles_a_sliding_window_model_whole_and_matches_eager():
    torch.manual_seed(0)
    model, ids = _sliding_model()
    model.eval()
    with torch.no_grad():
        out = torch.compile(model, fullgraph=True)(ids).last_hidden_state
        assert torch.allclose(out, model(ids).last_hidden_state, atol=1e-5, rtol=1e-4)


@needs_kernel
def test_torch_export_traces_a_sliding_window_model_and_gives_its_outputs():
    torch.manual_seed(0)
    model, ids = _sliding_model()
    model.eval()
    program = torch.export.export(model, (ids,))
    calls = [n for n in program.graph.nodes if n.target is torch.ops.hf_xarch.sliding_window_attention.default]
    assert len(calls) == model.config.num_hidden_layers
    with torch.no_grad():
        assert torch.equal(program.module()(ids).last_hidden_state, model(ids).last_hidden_state)


def test_the_kernel_is_built_from_the_source_as_it_was_at_import(monkeypatch, tmp_path):
    """The kernel compiles lazily, at first use; a C source rewritten on disk in between (a reinstall or a checkout
    under a long-running job) must not pair a new kernel with the Python side already imported."""
    if not (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")):
        pytest.skip("no C compiler")
    copy = tmp_path / native.KERNEL_FILE
    shutil.copyfile(native._BESIDE, copy)
    monkeypatch.setattr(native, "_KERNEL", [])
    monkeypatch.setattr(native, "_SOURCE", [native._BESIDE])
    monkeypatch.setattr(native, "_SOURCE_TEXT", {})
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path / "cache"))
    native.use_kernel_source(copy)  # read now, as the module reads its own source when imported
    copy.write_text("#error rewritten after import\n")
    assert native.native_kernel() is not None, native.native_kernel_error()
    q, k, v = (torch.randn(1, 2, 40, 8) for _ in range(3))
    expected = kernels.banded_attention(q, k, v, 5, 0, [1, 1], 0.3, native=False)
    torch.testing.assert_close(kernels.banded_attention(q, k, v, 5, 0, [1, 1], 0.3), expected)
