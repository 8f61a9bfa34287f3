"""Every command line takes its flags whole: a misspelt or shortened one (`--input_imag`) is an error,
never a silent abbreviation of another (argparse's allow_abbrev, off on every parser)."""

from __future__ import annotations

import argparse
import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

from qwen_vl_triton import cli
from qwen_vl_triton.cli import generate, quantize, serve

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("parse,before,short,value,whole", [
    (generate.parse_args, [], "--input_imag", ["cat.jpg"], "--input_image"),
    (generate.parse_args, [], "--max_output", ["8"], "--max_output_length"),
    (quantize.parse_args, ["--model_path", "a", "--output_path", "b", "--format", "ascend-w8a16"], "--overwr", [],
     "--overwrite"),
    (serve.parse_args, ["--model_path", "ckpt"], "--max_request_byte", ["1000"], "--max_request_bytes"),
], ids=["generate --input_imag", "generate --max_output", "quantize --overwr", "serve --max_request_byte"])
def test_an_abbreviated_flag_is_an_error(parse, before, short, value, whole, capsys):
    with pytest.raises(SystemExit) as e:
        parse([*before, short, *value])
    assert e.value.code == 2
    assert f"unrecognized arguments: {short}" in capsys.readouterr().err
    parse([*before, whole, *value])  # spelt out, it is taken


class _Parsing(Exception):
    """Raised by the first parse of a command's parser, carrying the parser."""

    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__()
        self.parser = parser


@pytest.mark.parametrize("name", [m.name for m in pkgutil.iter_modules(cli.__path__)])
def test_every_command_parser_refuses_abbreviations(name, monkeypatch):
    """Each qwen_vl_triton/cli module's parser, as its parse_args (or main) builds it, stopped at its
    first parse: nothing of the command runs."""
    module = importlib.import_module(f"qwen_vl_triton.cli.{name}")

    def stop(self: argparse.ArgumentParser, args=None, namespace=None):
        raise _Parsing(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", stop)
    with pytest.raises(_Parsing) as parsing:
        getattr(module, "parse_args", module.main)([])
    assert parsing.value.parser.allow_abbrev is False


def argument_parsers(path: Path) -> list[ast.Call]:
    """The ArgumentParser(...) calls in a source file."""
    return [node for node in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(node, ast.Call) and (getattr(node.func, "attr", None) == "ArgumentParser"
                                               or getattr(node.func, "id", None) == "ArgumentParser")]


def test_every_argument_parser_in_the_source_sets_allow_abbrev_false():
    """The benchmarks', the peers' and tools/ parsers too, which the test above does not build."""
    calls = {path: argument_parsers(path) for folder in ("qwen_vl_triton", "tools", "benchmarks", "tests")
             for path in sorted((REPO / folder).rglob("*.py"))}
    found = [(path, call) for path, in_file in calls.items() for call in in_file]
    assert len(found) >= 10, "the walk should find the project's parsers"
    lacking = [f"{path.relative_to(REPO)}:{call.lineno}" for path, call in found
               if not any(k.arg == "allow_abbrev" and isinstance(k.value, ast.Constant) and k.value.value is False
                          for k in call.keywords)]
    assert not lacking, f"ArgumentParser without allow_abbrev=False: {lacking}"
