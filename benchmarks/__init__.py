"""graphopt's own benchmark cases (``graphopt bench``), kept in the repository and not shipped in the wheel.

``graphopt bench`` loads this folder as one plugin when graphopt runs from a checkout (or with
``--cases DIR``); this hook registers every case. Each module measures its variants side by side in one
process (see ``graphopt.bench``) and documents them in its docstring.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import graphopt


def _lazy(module: str, function: str) -> Callable[[bool], dict[str, Any]]:
    """The case ``module.function``, imported when it runs (so listing cases imports no bench code)."""

    def case(quick: bool) -> dict[str, Any]:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{module}"), function)(quick)

    return case


CASES = (
    ("quickstart-sgd", "core", "quickstart_sgd"),
    ("optim: sgd 4xLinear(1024)", "optim", "bench_sgd"),
    ("optim: adamw 4xLinear(1024)", "optim", "bench_adamw"),
    ("optim: muon 4xLinear(1024)", "optim", "bench_muon"),
    ("optim: normuon 4xLinear(1024)", "optim", "bench_normuon"),
    ("optim: adamuon 4xLinear(1024)", "optim", "bench_adamuon"),
    ("optim: adago 4xLinear(1024)", "optim", "bench_adago"),
    ("optim: auon 4xLinear(1024)", "optim", "bench_auon"),
    ("optim: turbo_muon 4xLinear(1024)", "optim", "bench_turbo_muon"),
    ("optim: root 4xLinear(1024)", "optim", "bench_root"),
    ("hra", "hra", "bench_hra"),
    ("oftv2", "oftv2", "bench_oftv2"),
    ("sora", "sora", "bench_sora"),
    ("peft", "peft", "bench_peft"),
    ("peft: conv adapters", "peft", "bench_conv"),
    ("tract", "tract", "run_case"),
    ("layerdrop", "layerdrop", "bench_layerdrop"),
    ("real-models", "real_models", "bench_real_models"),
    ("hf: vs peft+compile", "hf_loops", "bench_hf_vs_peft_compiled"),
    ("hf: compiles per epoch", "hf_loops", "bench_compile_counts"),
    ("distributed", "distributed", "bench_distributed"),
    ("zoo", "zoo", "bench_zoo"),
)


@graphopt.hookimpl
def graphopt_bench_cases(register: Callable[..., None]) -> None:
    for name, module, function in CASES:
        register(name, _lazy(module, function), quick=True)
