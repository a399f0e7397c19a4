"""graphopt: rewrite PyTorch training graphs to inject training methods, each one a pluggy plugin.

    m = graphopt.compile(model, methods=["hra(r=8)", "adamw(lr=1e-3)"], loss_fn=F.cross_entropy)
    loss = m.step(x, target)
    graphopt.export(m, "model.onnx", example_inputs=(x,))

A method is a :class:`Method` (its options and ``apply(gm, ctx)``); what it may contribute, and when
each contribution runs, is documented once, in :mod:`graphopt.context`.
"""

from graphopt import optim
from graphopt.api import compile
from graphopt.compiled_model import CompiledModel, CompileStats
from graphopt.context import MethodContext
from graphopt.dynamo import backend
from graphopt.errors import (
    CaptureError,
    CheckpointError,
    ExportError,
    GraphoptError,
    InputError,
    MethodError,
    NotCapturedError,
    OptionError,
    PluginError,
    RewriteError,
    StepError,
)
from graphopt.export import ExportReport, export
from graphopt.hookspecs import hookimpl
from graphopt.interop import from_peft
from graphopt.method import Method, MethodInfo, Option
from graphopt.plugins import list_methods, register_plugin, unregister_plugin
from graphopt.progress import set_verbosity

__version__ = "0.1.0"

__all__ = [
    "CaptureError", "CheckpointError", "CompileStats", "CompiledModel", "ExportError", "ExportReport",
    "GraphoptError", "InputError", "Method", "MethodContext", "MethodError", "MethodInfo", "NotCapturedError",
    "Option", "OptionError", "PluginError", "RewriteError", "StepError", "__version__", "backend", "compile",
    "export",
    "from_peft", "hookimpl", "list_methods", "optim", "register_plugin", "set_verbosity", "unregister_plugin",
]
