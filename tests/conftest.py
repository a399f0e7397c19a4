"""Shared fixtures: the small MLP, one thread, and real entry-point plugins installed as temporary dist-info."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from models import MLP

import graphopt.plugins


@pytest.fixture
def mlp() -> MLP:
    torch.manual_seed(0)
    return MLP()


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny matrices: one thread avoids OpenMP spin-waits on a shared, loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_plugins() -> Iterator[None]:
    """Reload plugins before and after the test, so run-time registrations don't leak."""
    graphopt.plugins.reset()
    yield
    graphopt.plugins.reset()


@pytest.fixture
def install_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_plugins: None) -> Callable[..., None]:
    """Install a module as a distribution with a ``graphopt`` entry point (a real dist-info on sys.path)."""

    def install(dist: str, entry_name: str, module: str, source: str) -> None:
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
        info = tmp_path / f"{dist.replace('-', '_')}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[graphopt]\n{entry_name} = {module}\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        graphopt.plugins.reset()

    yield install
    for name in list(sys.modules):
        if name.startswith("toy_"):
            del sys.modules[name]


EXAMPLE_PLUGIN = Path(__file__).resolve().parents[1] / "examples" / "third_party_plugin"


def install_example_plugin(root: Path) -> None:
    """Put the example package (``examples/third_party_plugin``) on ``sys.path`` with the dist-info
    ``pip install`` would write for its pyproject, under ``root``."""
    info = root / "graphopt_peft_extras-0.1.0.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: graphopt-peft-extras\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[graphopt]\npeft_extras = graphopt_peft_extras\n")
    for path in (str(root), str(EXAMPLE_PLUGIN)):
        if path not in sys.path:
            sys.path.insert(0, path)
    graphopt.plugins.reset()


@pytest.fixture
def example_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_plugins: None) -> Iterator[None]:
    """The example third-party plugin installed for one test."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    install_example_plugin(tmp_path)
    yield
    for name in list(sys.modules):
        if name.startswith("graphopt_peft_extras"):
            del sys.modules[name]
