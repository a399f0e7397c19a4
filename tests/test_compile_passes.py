"""graphopt's inductor passes for the training step (``graphopt.train.compile_passes``)."""

from __future__ import annotations

import torch
from torch._inductor import config as inductor_config
from torch._inductor.utils import run_and_get_code

from graphopt.train.compile_passes import UnfuseCopiedAddmm


def momentum(param: torch.Tensor, buffer: torch.Tensor, x: torch.Tensor, dy: torch.Tensor) -> None:
    """SGD's in-place step: B ← μB + XᵀdY, P ← P − ηB (inductor makes the sum an addmm)."""
    buffer.mul_(0.9).add_(x.t() @ dy)
    param.sub_(buffer * 0.01)


def compiled_code(fn, *args, with_pass: bool) -> tuple[object, str]:
    torch._dynamo.reset()
    patch = {"post_grad_custom_post_pass": UnfuseCopiedAddmm()} if with_pass else {}
    with inductor_config.patch({**patch, "fx_graph_cache": False}):
        result, (code, *_) = run_and_get_code(torch.compile(fn, backend="inductor", fullgraph=True), *args)
    return result, code


def test_a_computed_addmm_operand_becomes_mm_and_a_fused_add() -> None:
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(*s, generator=gen) for s in ((32, 48), (32, 48), (16, 32), (16, 48))]
    expected = [t.clone() for t in start]
    momentum(*expected)
    codes = {}
    for with_pass in (False, True):
        state = [t.clone() for t in start]
        _, codes[with_pass] = compiled_code(momentum, *state, with_pass=with_pass)
        for got, want in zip(state[:2], expected[:2]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert "extern_kernels.addmm" in codes[False]  # what the pass undoes: addmm(0.9·B, Xᵀ, dY) copies 0.9·B first
    assert "extern_kernels.addmm" not in codes[True] and "extern_kernels.mm" in codes[True]


def test_a_bias_addmm_is_left_alone() -> None:
    """A linear layer's addmm reads a broadcast bias (no full-size copy to save): unchanged."""
    gen = torch.Generator().manual_seed(1)
    bias, x, w = torch.randn(48, generator=gen), torch.randn(16, 32, generator=gen), torch.randn(48, 32, generator=gen)
    result, code = compiled_code(lambda b, x, w: torch.relu(torch.addmm(b, x, w.t())), bias, x, w, with_pass=True)
    assert "extern_kernels.addmm" in code
    torch.testing.assert_close(result, torch.relu(torch.addmm(bias, x, w.t())))
