"""The ``graphopt`` command: ``methods``, ``show``, ``export`` and ``bench``."""

from __future__ import annotations

import argparse
import difflib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn

from graphopt.api import compile as compile_model
from graphopt.errors import GraphoptError
from graphopt.export import export
from graphopt.plugins import list_methods
from graphopt.rewrite.meta import capture_path


class CommandError(GraphoptError, ValueError):
    """A command-line argument that cannot be used (a model reference, a shape); the message says the fix."""


class Parser(argparse.ArgumentParser):
    """argparse with usage errors as one line on stderr (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def load_model(reference: str) -> nn.Module:
    """``MODULE:FACTORY`` or ``path/to/file.py:FACTORY`` → the model (the factory is called without arguments)."""
    module_name, sep, attr = reference.partition(":")
    if not sep or not attr or not module_name:
        raise CommandError(f"model reference {reference!r} must look like MODULE:FACTORY or file.py:FACTORY")
    try:
        if module_name.endswith(".py") or Path(module_name).exists():
            if not Path(module_name).is_file():
                raise CommandError(f"model file {module_name!r} does not exist")
            spec = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            sys.path.insert(0, str(Path.cwd()))
            module = importlib.import_module(module_name)
    except CommandError:
        raise
    except SyntaxError as err:
        raise CommandError(f"cannot import {module_name!r}: syntax error at line {err.lineno}: {err.msg}") from err
    except Exception as err:
        raise CommandError(f"cannot import {module_name!r}: {type(err).__name__}: {err}") from err
    factory = getattr(module, attr, None)
    if factory is None:
        raise CommandError(f"{module_name!r} has no attribute {attr!r}")
    if isinstance(factory, nn.Module):
        return factory
    if not callable(factory):
        raise CommandError(f"{reference} is a {type(factory).__name__}: give a module or a function returning one")
    try:
        inspect.signature(factory).bind()
    except (TypeError, ValueError) as err:
        raise CommandError(f"{reference} needs arguments ({err}); give a factory that takes none") from err
    try:
        model = factory()
    except Exception as err:
        raise CommandError(f"{reference}() raised {type(err).__name__}: {err}") from err
    if not isinstance(model, nn.Module):
        raise CommandError(f"{reference} gave {type(model).__name__}, not a torch.nn.Module")
    return model


def guess_input(model: nn.Module) -> tuple[int, ...]:
    """An input shape from the first Linear/Conv layer: ``(2, in)`` or ``(2, C, 32, 32)``."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            return (2, module.in_features)
        if isinstance(module, nn.Conv2d):
            return (2, module.in_channels, 32, 32)
        if isinstance(module, nn.Conv1d):
            return (2, module.in_channels, 64)
    raise CommandError("cannot guess the input shape; pass --input-shape, e.g. --input-shape 1,3,32,32")


def parse_ints(text: str, option: str, minimum: int) -> tuple[int, ...]:
    """``"2,16"`` → ``(2, 16)``; anything else is a ``CommandError`` naming ``option``."""
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise CommandError(f"{option} {text!r} must be comma-separated integers, e.g. {option} 2,16") from None
    if any(v < minimum for v in values):
        raise CommandError(f"{option} {text!r}: every value must be >= {minimum}")
    return values


def example_input(model: nn.Module, shape: str | None, dtype: str, high: int) -> torch.Tensor:
    dims = parse_ints(shape, "--input-shape", 1) if shape else guess_input(model)
    if dtype == "int64":
        if high < 1:
            raise CommandError(f"--high {high} must be >= 1 (token ids are drawn from [0, high))")
        return torch.randint(0, high, dims)
    return torch.randn(dims)


def cmd_methods(args: argparse.Namespace) -> int:
    methods = list_methods()
    rows = [(m.name, m.stage, m.plugin, ", ".join(str(o) for o in m.options)) for m in methods.values()]
    widths = [max(len(r[i]) for r in [("name", "stage", "plugin", "options"), *rows]) for i in range(3)]
    print(f"{'name':<{widths[0]}}  {'stage':<{widths[1]}}  {'plugin':<{widths[2]}}  options")
    for name, stage, plugin, options in sorted(rows):
        print(f"{name:<{widths[0]}}  {stage:<{widths[1]}}  {plugin:<{widths[2]}}  {options}")
        if args.verbose:
            print("    " + (methods[name].doc.splitlines() or [""])[0])
    return 0


def _compiled(args: argparse.Namespace) -> tuple[Any, torch.Tensor, nn.Module]:
    model = load_model(args.model)
    x = example_input(model, args.input_shape, args.input_dtype, args.high)
    dims = None if args.dynamic_dims is None else [parse_ints(args.dynamic_dims, "--dynamic-dims", 0)]
    compiled = compile_model(model, methods=args.method or [], example_inputs=(x,), backend="eager",
                             dynamic_dims=dims)
    return compiled, x, model


def cmd_show(args: argparse.Namespace) -> int:
    compiled, x, model = _compiled(args)
    original = compile_model(model, methods=[], example_inputs=(x,), backend="eager").graph_module
    rewritten = compiled.graph_module
    print(f"# captured with {capture_path(rewritten)}; methods: "
          f"{', '.join(m.spec() for m in compiled.methods) or 'none'}")
    print(rewritten.print_readable(print_output=False))
    for name, text in compiled.descriptions().items():
        print(f"# {name}:\n{text}")
    trainable = list(compiled.named_parameters())
    print(f"# trainable parameters: {sum(p.numel() for _, p in trainable)} in {len(trainable)} tensors")
    diff = difflib.unified_diff(original.code.splitlines(), rewritten.code.splitlines(),
                                "original", "rewritten", lineterm="")
    print("\n".join(diff) or "# (no change to the forward graph)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    compiled, x, _ = _compiled(args)
    report = export(compiled, args.output, example_inputs=(x,), merge=not args.no_merge)
    print(report)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from graphopt.bench import bench_cases, run

    if args.only:
        names = [case.name for case in bench_cases(args.cases) if case.quick or not args.quick]
        if not any(o in name for o in args.only for name in names):
            raise CommandError(f"no bench case matches {' / '.join(args.only)}; the cases: {', '.join(names)}")
    run(quick=args.quick, only=args.only, json_path=args.json, cases_dir=args.cases)
    if args.json:
        print(f"wrote {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="graphopt", description="Rewrite PyTorch training graphs with methods.")
    parser.add_argument("--debug", action="store_true", help="on an error, show the whole traceback")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    methods = sub.add_parser("methods", help="list every registered method with its stage, plugin and options")
    methods.add_argument("-v", "--verbose", action="store_true", help="also print each method's summary")
    methods.set_defaults(func=cmd_methods)

    def model_command(name: str, help_text: str) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help_text)
        command.add_argument("model", help="MODULE:FACTORY or file.py:FACTORY returning an nn.Module")
        command.add_argument("-m", "--method", action="append", help="a method spec, e.g. \"hra(r=8)\"; repeatable")
        command.add_argument("--input-shape", help="example input shape, e.g. 1,3,32,32 (default: guessed)")
        command.add_argument("--input-dtype", choices=("float32", "int64"), default="float32")
        command.add_argument("--high", type=int, default=100, help="upper bound of int64 inputs (token ids)")
        command.add_argument("--dynamic-dims", help="input dims kept dynamic, e.g. 0,1 for (batch, seq) token ids "
                                                    "(default: 0, the batch)")
        return command

    model_command("show", "print the rewritten graph and a diff against the original").set_defaults(func=cmd_show)
    exporter = model_command("export", "export the rewritten model to .onnx, .pt2 or .py")
    exporter.add_argument("-o", "--output", required=True, help="output file: .onnx, .pt2 or .py")
    exporter.add_argument("--no-merge", action="store_true", help="keep adapter nodes instead of folding them")
    exporter.set_defaults(func=cmd_export)

    bench = sub.add_parser("bench", help="run the benchmark cases plugins contribute")
    bench.add_argument("--quick", action="store_true", help="small, fast variants of each case")
    bench.add_argument("--json", help="write the results to this JSON file")
    bench.add_argument("--only", action="append", help="run only cases whose name contains this; repeatable")
    bench.add_argument("--cases", help="a folder of benchmark cases to load (default: the repository's benchmarks/ "
                                       "folder when graphopt runs from a checkout)")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; an error is one line on stderr (exit 2 for graphopt's own errors, 1 for others), or the
    whole traceback with ``--debug``."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as err:
        if args.debug:
            raise
        one_line = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        if isinstance(err, GraphoptError):
            print(f"error: {one_line}", file=sys.stderr)
            return 2
        print(f"error: {type(err).__name__}: {one_line} (run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
