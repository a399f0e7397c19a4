"""Eager ``torch.optim`` versions of the Muon family, the baselines of the ``optim: <name>`` bench cases.

Each is the formula of tests/test_optimizer_family.py's reference (the paper's update rule, in plain PyTorch)
written as a ``torch.optim.Optimizer`` stepping ``.grad`` with in-place ops: the matrix rule for every ≥2-D
parameter viewed ``(rows, rest)``, AdamW(betas=(0.9, 0.95), eps=1e-8, wd=0) with lr ``adamw_lr`` for the rest.
Defaults are graphopt's. No graphopt code is used.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

MUON = (3.4445, -4.7750, 2.0315)
TURBO = ((4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037),
         (2.8769, -3.1427, 1.2046), (2.8366, -3.0525, 1.2012))
DEFAULTS: dict[str, dict[str, Any]] = {  # graphopt's defaults of each optimizer
    "normuon": {"lr": 1e-3, "betas": (0.95, 0.95), "eps": 1e-8, "ns_steps": 5, "weight_decay": 0.0, "adamw_lr": 1e-3},
    "adamuon": {"lr": 1e-3, "momentum": 0.95, "nesterov": False, "ns_steps": 5, "eps": 1e-8, "weight_decay": 0.0,
                "adamw_lr": 1e-3},
    "adago": {"lr": 0.1, "momentum": 0.95, "gamma": 1.0, "eps": 1e-6, "v0": 1.0, "ns_steps": 5, "weight_decay": 0.0,
              "adamw_lr": 3e-4},
    "auon": {"lr": 0.055, "momentum": 0.95, "nesterov": True, "hybrid": False, "weight_decay": 0.0, "adamw_lr": 3e-4},
    "turbo_muon": {"lr": 0.02, "momentum": 0.95, "nesterov": True, "ns_steps": 4, "weight_decay": 0.0,
                   "adamw_lr": 3e-4},
    "root": {"lr": 1e-3, "momentum": 0.95, "nesterov": True, "ns_steps": 5, "threshold_quantile": 0.9,
             "weight_decay": 0.0, "adamw_lr": 1e-3},
}
ROOT_TABLE = {(2048, 2048): (3.4916, -4.8224, 2.1095), (2048, 3072): (3.4509, -4.5790, 1.9325),
              (2048, 8192): (2.9794, -3.6674, 1.6207), (2048, 16384): (3.1943, -3.8221, 1.5322)}


def newton_schulz(m: torch.Tensor, schedule, aol: bool = False) -> torch.Tensor:
    """The quintic iteration on ``m`` (``mᵀ`` when tall), from ``m/‖m‖_F`` or the AOL-rescaled ``m``."""
    x = m.T if m.shape[0] > m.shape[1] else m
    gram = None
    if aol:  # the first iteration reuses the rescaled Gram matrix, as the authors' code does
        gram = x @ x.T
        s = gram.abs().sum(dim=1).clamp_min(1e-6).rsqrt()
        x, gram = x * s[:, None], gram * s[:, None] * s[None, :]
    else:
        x = x / x.norm().clamp_min(torch.finfo(x.dtype).tiny)
    for a, b, c in schedule:
        gram = x @ x.T if gram is None else gram
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        gram = None
    return x.T if m.shape[0] > m.shape[1] else x


class EagerFamily(torch.optim.Optimizer):
    """The shared frame: ``matrix_step`` for matrices, AdamW for the rest."""

    key: ClassVar[str] = ""

    def __init__(self, params, **options: Any) -> None:
        super().__init__(params, {**DEFAULTS[self.key], **options})

    def matrix_step(self, p: torch.Tensor, g: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        """Return the update ``U`` (matrix view) of ``W ← W·(1 − ηλ) − U``; may update ``state``."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state, g = self.state[p], p.grad
                if p.dim() >= 2:
                    update = self.matrix_step(p, g.reshape(p.shape[0], -1), state, group)
                    if group["weight_decay"]:
                        p.mul_(1 - group["lr"] * group["weight_decay"])
                    p.sub_(update.reshape(p.shape))
                    continue
                t = state["step"] = state.get("step", 0) + 1
                m = state.setdefault("exp_avg", torch.zeros_like(p))
                v = state.setdefault("exp_avg_sq", torch.zeros_like(p))
                m.lerp_(g, 0.1)
                v.mul_(0.95).addcmul_(g, g, value=0.05)
                denom = (v.sqrt() / math.sqrt(1 - 0.95 ** t)).add_(1e-8)
                p.addcdiv_(m, denom, value=-group["adamw_lr"] / (1 - 0.9 ** t))


def zeros(state: dict, key: str, like: torch.Tensor) -> torch.Tensor:
    return state.setdefault(key, torch.zeros_like(like))


class EagerNorMuon(EagerFamily):
    """Li et al. 2025, Algorithm 1."""

    key = "normuon"

    def matrix_step(self, p, g, state, group):
        (beta1, beta2), lr = group["betas"], group["lr"]
        m = zeros(state, "M", g).lerp_(g, 1 - beta1)
        o = newton_schulz(m, [MUON] * group["ns_steps"])
        v = state.setdefault("v", g.new_zeros(g.shape[0])).lerp_(o.square().mean(dim=1), 1 - beta2)
        o = o / v.sqrt().add_(group["eps"])[:, None]
        return o.mul_(0.2 * lr * math.sqrt(o.numel()) / o.norm())


class EagerAdaMuon(EagerFamily):
    """Si et al. 2025, Algorithm 1."""

    key = "adamuon"

    def matrix_step(self, p, g, state, group):
        beta = group["momentum"]
        m = zeros(state, "M", g).mul_(beta).add_(g)
        o = newton_schulz((g + beta * m if group["nesterov"] else m).sign(), [MUON] * group["ns_steps"])
        v = zeros(state, "V", g).mul_(beta).addcmul_(o, o, value=1 - beta)
        o = o / v.sqrt().add_(group["eps"])
        return o.mul_(group["lr"] * 0.2 * math.sqrt(o.numel()) / o.norm())


class EagerAdaGO(EagerFamily):
    """Zhang, Liu and Schaeffer 2025, Algorithm 1."""

    key = "adago"

    def matrix_step(self, p, g, state, group):
        m = zeros(state, "M", g).lerp_(g, 1 - group["momentum"])
        clamped = g.norm().clamp_max(group["gamma"])
        v_sq = state.setdefault("v_sq", g.new_full((), group["v0"] ** 2)).add_(clamped.square())
        alpha = (group["lr"] * clamped / v_sq.sqrt()).clamp_min(group["eps"])
        return newton_schulz(m, [MUON] * group["ns_steps"]).mul_(alpha)


class EagerAuON(EagerFamily):
    """Maity 2025, section 3 (hybrid: section 3.2)."""

    key = "auon"

    def matrix_step(self, p, g, state, group):
        mu = group["momentum"]
        b = zeros(state, "B", g).lerp_(g, 1 - mu)
        d = g.lerp(b, mu) if group["nesterov"] else b
        x = newton_schulz(d, [MUON]) if group["hybrid"] else d / (d.norm() + 1e-7)
        return x.mul_(group["lr"] / (torch.cosh(x).square().mean().sqrt() + 1e-8))


class EagerTurboMuon(EagerFamily):
    """Boissin et al. 2025: Muon with AOL preconditioning and the last ns_steps of the 5-step schedule."""

    key = "turbo_muon"

    def matrix_step(self, p, g, state, group):
        mu = group["momentum"]
        b = zeros(state, "B", g).mul_(mu).add_(g)
        x = newton_schulz(g + mu * b if group["nesterov"] else b, TURBO[-group["ns_steps"]:], aol=True)
        return x.mul_(group["lr"] * max(1.0, g.shape[0] / g.shape[1]) ** 0.5)


class EagerROOT(EagerFamily):
    """He et al. 2025, Algorithm 1 with the authors' threshold and scale; Muon's coefficients off their table."""

    key = "root"

    def matrix_step(self, p, g, state, group):
        mu = group["momentum"]
        b = zeros(state, "B", g).mul_(mu).add_(g)
        m = g + mu * b if group["nesterov"] else b
        eps = torch.quantile(m.abs().flatten(), group["threshold_quantile"]) + 1e-9
        robust = m.clamp(-eps, eps)  # M − T_ε[M]
        rows, cols = g.shape
        coefficients = ROOT_TABLE.get((min(rows, cols), max(rows, cols)), MUON)
        x = newton_schulz(robust, [coefficients] * group["ns_steps"])
        return x.mul_(group["lr"] * 0.2 * math.sqrt(max(rows, cols)))


EAGER = {"normuon": EagerNorMuon, "adamuon": EagerAdaMuon, "adago": EagerAdaGO, "auon": EagerAuON,
         "turbo_muon": EagerTurboMuon, "root": EagerROOT}
