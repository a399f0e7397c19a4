"""``graphopt bench``: the benchmark harness. Cases come from plugins (``graphopt_bench_cases``) and from a
folder of cases: graphopt's own live in the repository's top-level ``benchmarks/`` folder (not shipped in
the wheel), loaded as one plugin when graphopt runs from a checkout, or from ``--cases DIR``.

A case is ``fn(quick: bool) -> dict`` that measures its variants side by side in one process and
returns JSON-able results (use :func:`time_steps` and :func:`peak_memory_mib`). Timings are medians
over blocks of steps, taken after warm-up; compare only ratios measured within one run.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from graphopt.errors import OptionError
from graphopt.plugins import get_plugin_manager, register_plugin

CASES_PACKAGE = "graphopt_benchmarks"


@dataclass(frozen=True)
class BenchCase:
    """A registered benchmark case; ``quick`` cases run under ``graphopt bench --quick``."""

    name: str
    fn: Callable[[bool], dict[str, Any]]
    quick: bool = True
    plugin: str = ""


def default_cases_dir() -> Path | None:
    """The repository's ``benchmarks/`` folder when graphopt runs from a checkout (an editable install)."""
    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    return folder if (folder / "__init__.py").is_file() else None


def load_cases_dir(folder: str | Path) -> None:
    """Import the package ``folder`` (its ``__init__.py`` implements ``graphopt_bench_cases``) as a plugin."""
    folder = Path(folder).resolve()
    init = folder / "__init__.py"
    if not init.is_file():
        raise OptionError(f"--cases {folder}: not a folder of benchmark cases (it needs an __init__.py that "
                          "implements graphopt_bench_cases)")
    name = CASES_PACKAGE if folder == default_cases_dir() else f"{CASES_PACKAGE}_{folder.name}"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(folder)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    if not get_plugin_manager().is_registered(module):
        register_plugin(module, name=name)


def bench_cases(cases_dir: str | Path | None = None) -> list[BenchCase]:
    """Every case contributed by a plugin, in registration order, after loading ``cases_dir`` (default:
    :func:`default_cases_dir`)."""
    folder = cases_dir if cases_dir is not None else default_cases_dir()
    if folder is not None:
        load_cases_dir(folder)
    cases: list[BenchCase] = []
    manager = get_plugin_manager()
    for impl in manager.hook.graphopt_bench_cases.get_hookimpls():
        def register(name: str, fn: Callable[[bool], dict[str, Any]], quick: bool = True,
                     _plugin: str = impl.plugin_name) -> None:
            cases.append(BenchCase(name, fn, quick, _plugin))
        try:
            impl.function(register=register)
        except Exception as err:
            message = f"plugin {impl.plugin_name!r} failed in graphopt_bench_cases: {type(err).__name__}: {err}"
            cases.append(BenchCase(f"{impl.plugin_name} (broken)", _raiser(message), True, impl.plugin_name))
    return cases


def _raiser(message: str) -> Callable[[bool], dict[str, Any]]:
    def fail(quick: bool) -> dict[str, Any]:
        raise RuntimeError(message)
    return fail


def time_steps(variants: dict[str, Callable[[], Any]], steps: int = 20, warmup: int = 3, block: int = 5,
               progress: bool = True) -> dict[str, float]:
    """Median ms per call of each variant, interleaved block by block so load affects all alike.

    Each variant is first called ``warmup`` times (compiles happen there); then the variants take turns
    running ``block`` calls each until every one ran ``steps`` calls; the result is the median over
    blocks of (block time / block).
    """
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    blocks: dict[str, list[float]] = {name: [] for name in variants}
    rounds = max(1, steps // block)
    for _ in tqdm(range(rounds), desc="timing " + ", ".join(variants), disable=not progress, leave=False):
        for name, fn in variants.items():
            start = time.perf_counter()
            for _ in range(block):
                fn()
            blocks[name].append((time.perf_counter() - start) * 1000 / block)
    return {name: statistics.median(times) for name, times in blocks.items()}


def peak_memory_mib(fn: Callable[[], Any]) -> float:
    """Peak CPU memory held by torch tensors during one call of ``fn``, in MiB.

    From the torch.profiler memory timeline: tensors alive before the call (``PREEXISTING``: parameters,
    optimizer state) plus those created minus those destroyed, maximised over the call.

    The profiler does not see buffers allocated inside inductor-compiled code (a compiled step reports
    almost no allocations), so compare memory on ``backend="eager"`` variants: the same traced training
    graph, run op by op.
    """
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    total, peak = 0, 0
    for _, action, _, size in sorted(prof._memory_profile().timeline, key=lambda event: event[0]):
        if action in (Action.PREEXISTING, Action.CREATE):
            total += size
        elif action == Action.DESTROY:
            total -= size
        peak = max(peak, total)
    return round(peak / 2**20, 2)


def inductor_buffer_peak_mib(fn: Callable[[], Any]) -> float:
    """Peak of the buffers inductor-compiled code allocates during one call of ``fn``, in MiB: the most bytes
    of the buffers the generated wrappers allocate (``empty_strided_cpu``) that are alive at once.

    The profiler's memory timeline does not see these allocations (see :func:`peak_memory_mib`), so every
    loaded wrapper's allocator is wrapped for the call; a buffer counts until its Python object is freed
    (``del bufN``). Extern kernels (matmuls) write into wrapper-allocated buffers (``out=``), so for graphs of
    matmuls and fused kernels this is every temporary; tensors alive before the call are not counted.
    """
    import weakref

    from torch._inductor.codecache import PyCodeCache

    modules = [mod for mod in PyCodeCache.modules if hasattr(mod, "empty_strided_cpu")]
    if not modules:
        raise RuntimeError("no inductor-compiled code is loaded; run the compiled function once first")
    live, peak = [0], [0]
    originals = {mod: mod.empty_strided_cpu for mod in modules}

    def tracked(allocate: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def allocate_tracked(size: Any, stride: Any, dtype: torch.dtype) -> torch.Tensor:
            tensor = allocate(size, stride, dtype)
            nbytes = tensor.untyped_storage().nbytes()
            live[0] += nbytes
            peak[0] = max(peak[0], live[0])
            weakref.finalize(tensor, lambda: live.__setitem__(0, live[0] - nbytes))
            return tensor
        return allocate_tracked

    for mod, allocate in originals.items():
        mod.empty_strided_cpu = tracked(allocate)
    try:
        fn()
    finally:
        for mod, allocate in originals.items():
            mod.empty_strided_cpu = allocate
    return round(peak[0] / 2**20, 2)


def ratios(times: dict[str, float], baseline: str) -> dict[str, float]:
    """Each variant's time divided by ``baseline``'s."""
    return {name: round(t / times[baseline], 3) for name, t in times.items()}


def run(quick: bool = False, only: Iterable[str] | None = None, json_path: str | None = None,
        cases_dir: str | Path | None = None) -> dict[str, Any]:
    """Run the cases (all, or those whose name contains one of ``only``) and print a table."""
    torch.manual_seed(0)
    selected = [c for c in bench_cases(cases_dir)
                if (c.quick or not quick) and (not only or any(o in c.name for o in only))]
    results: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads(), "quick": quick,
                               "cases": {}}
    for case in tqdm(selected, desc="graphopt bench"):
        start = time.perf_counter()
        try:
            outcome = case.fn(quick)
        except Exception as err:
            outcome = {"error": f"{type(err).__name__}: {err}"}
        outcome["seconds"] = round(time.perf_counter() - start, 1)
        outcome["plugin"] = case.plugin
        results["cases"][case.name] = outcome
        print(format_case(case.name, outcome), flush=True)
    if json_path:
        with open(json_path, "w") as handle:
            json.dump(results, handle, indent=2, default=str)
    return results


def format_case(name: str, outcome: dict[str, Any]) -> str:
    """A readable block for one case: its flat numbers, one per line."""
    lines = [f"== {name}"]
    for key, value in outcome.items():
        if isinstance(value, dict):
            inner = ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
            lines.append(f"  {key:<22} {inner}")
        else:
            lines.append(f"  {key:<22} {_fmt(value)}")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)
