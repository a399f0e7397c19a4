"""Peak memory of a fused optimizer step: each gradient dies right after its parameter's update.

Measured with the torch.profiler memory timeline (``graphopt.bench.peak_memory_mib``): tensors alive before
the step (parameters, optimizer state) plus those created minus those freed, maximised over the step. The
model's gradients are 1 MiB each and its activations a few KiB, so the peak above the parameters counts
the gradients alive at once.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphopt
import graphopt.train.step
from graphopt.bench import inductor_buffer_peak_mib, peak_memory_mib

LAYERS, WIDTH = 8, 512
GRAD_MIB = WIDTH * WIDTH * 4 / 2**20  # 1 MiB per weight gradient (float32)


def linear_stack(bias: bool) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """LAYERS × Linear(WIDTH, WIDTH) with ReLU between, and a batch of 4."""
    torch.manual_seed(0)
    layers = []
    for _ in range(LAYERS):
        layers += [nn.Linear(WIDTH, WIDTH, bias=bias), nn.ReLU()]
    return nn.Sequential(*layers[:-1]), torch.randn(4, WIDTH), torch.randint(0, WIDTH, (4,))


def peak_above_parameters(spec: str, on_nonfinite: str = "apply") -> float:
    model, x, y = linear_stack(bias=False)
    m = graphopt.compile(model, methods=[spec], loss_fn=F.cross_entropy, backend="eager", on_nonfinite=on_nonfinite)
    m.step(x, y)  # builds the graph
    state_mib = sum(v.numel() * v.element_size() for s in m.optimizer_state().values() for v in s.values()) / 2**20
    return peak_memory_mib(lambda: m.step(x, y)) - LAYERS * GRAD_MIB - state_mib


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("spec", ["sgd(lr=0.1)", "adamw", "muon"])
def test_at_most_two_gradients_alive(spec) -> None:
    extra = peak_above_parameters(spec)
    # one gradient being consumed, the next one being produced, plus ~0.1 MiB of activations / scalars;
    # muon also holds its update direction and the Newton–Schulz iterate (each one gradient's size)
    allowed = (4 if spec == "muon" else 2) * GRAD_MIB + 0.5
    assert extra <= allowed, f"{spec}: {extra:.2f} MiB above parameters and state"


def test_without_scheduling_or_with_clipping_all_gradients_live(monkeypatch) -> None:
    """Positive controls: the measurement sees all gradients when the updates wait for the whole backward."""
    clipped = peak_above_parameters("sgd(lr=0.1, max_grad_norm=1.0)")
    assert clipped >= (LAYERS - 0.5) * GRAD_MIB
    monkeypatch.setattr(graphopt.train.step, "schedule_updates", lambda gm: gm)
    unscheduled = peak_above_parameters("sgd(lr=0.1)")
    assert unscheduled >= (LAYERS - 0.5) * GRAD_MIB


def test_guarded_updates_keep_every_gradient_until_all_are_checked() -> None:
    """on_nonfinite='raise'/'skip' need every gradient to know all are finite: the documented memory cost."""
    for policy in ("raise", "skip"):
        assert peak_above_parameters("sgd(lr=0.1)", on_nonfinite=policy) >= (LAYERS - 0.5) * GRAD_MIB


def inductor_peak_above_parameters(spec: str) -> float:
    """The compiled step's temporaries (``graphopt.bench.inductor_buffer_peak_mib``) on a stack of biased
    Linear layers: inductor runs each weight's update in the kernel that reduces the next bias gradient."""
    model, x, y = linear_stack(bias=True)
    m = graphopt.compile(model, methods=[spec], loss_fn=F.cross_entropy, on_nonfinite="apply")
    m.step(x, y)
    return inductor_buffer_peak_mib(lambda: m.step(x, y))


@pytest.mark.parametrize("spec", ["sgd(lr=0.1, momentum=0.9)", "adamw", "muon"])
def test_compiled_step_holds_one_weight_gradient_at_a_time(spec) -> None:
    """``HoistUpdates`` issues each update as soon as its gradient exists and the weight's readers are done."""
    extra = inductor_peak_above_parameters(spec)
    allowed = (3.5 if spec == "muon" else 1.5) * GRAD_MIB  # muon: + its direction and Newton–Schulz iterate
    assert extra <= allowed, f"{spec}: {extra:.2f} MiB of temporaries"


def test_without_hoisting_inductor_keeps_two_weight_gradients(monkeypatch) -> None:
    """Positive control: inductor's own order runs sgd's weight update in the kernel after the next weight
    gradient's GEMM, so two weight gradients are alive at once."""
    monkeypatch.setattr(graphopt.train.step, "HoistUpdates", lambda: None)
    with torch._inductor.config.patch(fx_graph_cache=False):
        assert inductor_peak_above_parameters("sgd(lr=0.1, momentum=0.9)") >= 1.9 * GRAD_MIB
