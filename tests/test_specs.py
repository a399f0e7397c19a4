"""Method specs: parsing with ast (never eval), option validation, unknown methods."""

from __future__ import annotations

import pytest

import graphopt
from graphopt.specs import parse_spec


def test_parse_forms() -> None:
    assert parse_spec("sgd") == ("sgd", {})
    assert parse_spec(" sgd(lr=0.1, momentum=0.9) ") == ("sgd", {"lr": 0.1, "momentum": 0.9})
    assert parse_spec("x(targets=['a.*', 'b'], betas=(0.9, 0.99), g={'*.bias': {'wd': 0}}, f=None, t=True)") == (
        "x", {"targets": ["a.*", "b"], "betas": (0.9, 0.99), "g": {"*.bias": {"wd": 0}}, "f": None, "t": True})


@pytest.mark.parametrize("spec, message", [
    ("sgd(lr=__import__('os').getcwd())", "must be a literal"),
    ("sgd(0.1)", "must be given by name"),
    ("sgd(lr=0.1", "cannot parse"),
    ("sgd x(lr=1)", "cannot parse"),
    ("sgd(lr=1) + 2", "cannot parse"),
    ("sgd(**{'lr': 1})", "'**' is not allowed"),
])
def test_bad_syntax(spec: str, message: str) -> None:
    with pytest.raises(graphopt.OptionError, match=message.replace("*", r"\*").replace("(", r"\(")):
        graphopt.compile(methods=[spec])


def test_spec_is_never_evaluated(tmp_path, monkeypatch) -> None:
    marker = tmp_path / "evaluated"
    with pytest.raises(graphopt.OptionError):
        graphopt.compile(methods=[f"sgd(lr=open({str(marker)!r}, 'w'))"])
    assert not marker.exists()


@pytest.mark.parametrize("spec, message", [
    ("sgd(lr=0.1, momentun=0.9)", "method 'sgd' has no option 'momentun'; its options are: lr, momentum=0.0"),
    ("sgd(lr='fast')", "method 'sgd': option 'lr' must be float, got 'fast'"),
    ("sgd(lr=True)", "option 'lr' must be float"),
    ("sgd(lr=-1.0)", r"method 'sgd': option lr=-1.0 is invalid; use lr >= 0"),
    ("sgd(lr=0.1, momentum=1.5)", "option momentum=1.5 is invalid"),
    ("sgd(lr=0.1, nesterov=True)", "nesterov=True needs momentum > 0"),
    ("sgd", "method 'sgd' needs option 'lr'"),
])
def test_option_errors_name_method_option_and_allowed(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        graphopt.compile(methods=[spec])


def test_tuple_form_and_int_for_float() -> None:
    compiled = graphopt.compile(methods=[("sgd", {"lr": 1, "momentum": 0.5})])
    assert callable(compiled)


def test_unknown_method_lists_close_names() -> None:
    with pytest.raises(graphopt.OptionError, match=r"unknown method 'sdg'; did you mean 'sgd'[,?].*graphopt methods"):
        graphopt.compile(methods=["sdg(lr=0.1)"])


def test_method_listed_twice() -> None:
    with pytest.raises(graphopt.OptionError, match="listed twice"):
        graphopt.compile(methods=["sgd(lr=0.1)", "sgd(lr=0.2)"])


def test_bad_spec_type_and_backend() -> None:
    with pytest.raises(graphopt.OptionError, match="bad method spec"):
        graphopt.compile(methods=[42])
    with pytest.raises(graphopt.OptionError, match="unknown backend 'tvm'"):
        graphopt.compile(methods=[], backend="tvm")
