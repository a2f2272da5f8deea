import inspect
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Optional, Union

import pytest
import torch
from helpers import REPO

from llama.checks import parse_dtype
from llama.cli import resolve_model
from llama.commandline import checked_args, fire_checked, read_args


def test_parse_dtype():
    assert parse_dtype(None) is None
    assert parse_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'fp8'; use one of float32, float16, bfloat16"):
        parse_dtype("fp8")


def test_resolve_model():
    ckpt, tok, name = resolve_model(None, None)
    assert ckpt.endswith("demo") and tok.endswith("tokenizer.model") and "demo" in name
    assert resolve_model("a", "b") == ("a", "b", "a")
    with pytest.raises(ValueError, match="give both"):
        resolve_model(None, "b")


# ------------------------------------------------------------------------ command lines (llama.commandline)


def tool(
    ckpt_dir: str,
    out_dir: str,
    mode: str,
    group_size: int = 32,
    compile: bool = False,
    system: Optional[str] = None,
    temperature: float = 0.6,
    path: Union[str, Path, None] = None,
) -> None:
    """A command line with every kind of parameter the project's CLIs have."""


def fire_reads(args: list[str]) -> dict:
    """The arguments fire itself passes to tool for args (its private parser, as an oracle), and what it leaves."""
    import fire.core
    import fire.decorators

    (varargs, kwargs), _, remaining, _ = fire.core._MakeParseFn(tool, fire.decorators.GetMetadata(tool))(list(args))
    assert not remaining, remaining
    return dict(inspect.signature(tool).bind(*varargs, **kwargs).arguments)


@pytest.mark.parametrize(
    "args",
    [
        ["a", "b", "int8"],
        ["--ckpt_dir=a", "--out_dir", "b", "--mode", "int8", "16"],  # the rest by position
        ["a", "-o", "b", "-m", "int8", "--compile"],  # -o: the one parameter starting with o
        ["a", "b", "int8", "--nocompile", "--temperature", "-1"],  # -1 is a value, not a flag
        ["--mode=int8", "a", "b", "-g=8", "--compile=False"],
        ["a", "b", "int8", "--group-size", "8", "-temperature", "0"],  # hyphens as underscores, one dash
        ["a", "b", "int8", "--system", "'42'", "--path", "/tmp/x"],
        ["a", "b", "int8", "--system", "None"],
    ],
)
def test_flags_are_read_as_fire_reads_them(args):
    defaults = {name: p.default for name, p in inspect.signature(tool).parameters.items() if p.default is not p.empty}
    mine = {**defaults, **{name: given.value for name, given in read_args(tool, args, "tool").items()}}
    fires = fire_reads(args)
    assert {name: (value, type(value)) for name, value in mine.items()} == {
        name: (value, type(value)) for name, value in fires.items()
    }
    assert checked_args(tool, args, "tool") == args


@pytest.mark.parametrize(
    "args, error, message",
    [
        (["--groupsize", "16"], ValueError, r"unknown flag --groupsize \(did you mean --group_size\?\); tool takes "
         r"--ckpt_dir, --out_dir, --mode, --group_size, --compile, --system, --temperature, --path \(see --help\)"),
        (["--quantise=int8", "--dry-run"], ValueError, r"unknown flags --quantise=int8, --dry-run; tool takes"),
        (["--no-compile"], ValueError, r"unknown flag --no-compile \(did you mean --nocompile"),
        (["-x", "1"], ValueError, r"unknown flag -x;"),
        (["-c", "1"], ValueError, r"-c is ambiguous: it could be any of --ckpt_dir, --compile"),
        (["16", "True", "s", "0.5", "p", "extra"], ValueError, r"unexpected argument\(s\) 'extra': tool takes "
         r"--ckpt_dir, .*, the first ones also by position"),  # each parameter can take one by position
        (["--group_size", "8", "--group-size=16"], ValueError, r"--group_size is given twice \(8 and 16\); give it"),
        (["-", "upper"], ValueError, r"unexpected argument\(s\) after '-': upper"),
        (["--system", "42"], TypeError,
         r"--system must be text, not 42 \(read as int\); to pass it as text, quote it for Python as well: "
         r"--system '\"42\"'"),
        (["--system", "[1,2]"], TypeError, r"--system must be text, not \[1,2\] \(read as list\)"),
        (["--system"], TypeError, r"--system needs a value \(text\), as in --system=VALUE"),
        (["--group_size", "abc"], TypeError, r"--group_size must be an integer, not 'abc'"),
        (["--group_size", "1.5"], TypeError, r"--group_size must be an integer, not 1.5 \(read as float\)"),
        (["--group_size", "True"], TypeError, r"--group_size must be an integer, not True \(read as bool\)"),
        (["--temperature", "nan"], TypeError, r"--temperature must be a number, not 'nan'"),
        (["--compile", "yes"], TypeError, r"--compile must be True or False, not 'yes'; write --compile or "
         r"--nocompile alone"),
        (["--path", "2024"], TypeError, r"--path must be text or a path, not 2024"),
    ],
)
def test_bad_command_lines_are_refused_naming_the_flag(args, error, message):
    with pytest.raises(error, match=message):
        checked_args(tool, ["a", "b", "int8", *args], "tool")


def test_a_positional_value_of_the_wrong_type_is_refused():
    with pytest.raises(TypeError, match=r"the argument '42' \(for ckpt_dir\) must be text, not 42"):
        checked_args(tool, ["42", "b", "int8"], "tool")


def test_help_anywhere_shows_the_help_and_runs_nothing(capsys):
    assert checked_args(tool, ["a", "--groupsize", "1", "-h"], "tool") == ["--help"]
    assert checked_args(tool, ["a", "--", "--help"], "tool") == ["--help"]  # fire's own help flag
    calls = []

    def everything_optional(a: int = 1) -> None:
        calls.append(a)

    with pytest.raises(SystemExit) as exit:
        fire_checked(everything_optional, ["--a", "2", "--help"], name="tool")
    assert exit.value.code == 0 and calls == []  # fire alone calls the function, then shows the help
    assert "--a=A" in capsys.readouterr().err


def test_fire_checked_exits_2_before_calling_and_passes_good_lines_to_fire(capsys):
    calls = []

    def run(a: int = 1, flag: bool = False) -> None:
        calls.append((a, flag))

    with pytest.raises(SystemExit) as exit:
        fire_checked(run, ["--a", "2", "--b", "3"], name="tool")
    assert exit.value.code == 2 and calls == []
    assert capsys.readouterr().err == "ERROR: unknown flag --b; tool takes --a, --flag (see --help)\n"
    fire_checked(run, ["--a", "2", "--flag"], name="tool")
    assert calls == [(2, True)]


def test_subcommands_are_checked_too():
    commands = {"to_hf": tool, "from_hf": tool}
    with pytest.raises(ValueError, match=r"unknown command 'tohf' \(did you mean to_hf\?\); x takes one of to_hf, "
                       r"from_hf"):  # fmt: skip
        checked_args(commands, ["tohf", "a"], "x")
    with pytest.raises(ValueError, match=r"unknown flag --dtyp; x to_hf takes --ckpt_dir"):
        checked_args(commands, ["to-hf", "a", "b", "int8", "--dtyp", "float32"], "x")
    assert checked_args(commands, ["to-hf", "a", "b", "int8"], "x") == ["to-hf", "a", "b", "int8"]
    assert checked_args(commands, ["from_hf", "-h"], "x") == ["from_hf", "--help"]  # not --hf_dir, as fire reads it
    assert checked_args(commands, [], "x") == []  # fire lists the commands


def run_python(args: list[str], env: Optional[dict] = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_every_command_line_refuses_a_mistyped_flag_before_doing_anything(make_checkpoint, tokenizer_path, tmp_path):
    """Before, each of these wrote its folder or printed its results, and only then failed on the flag."""
    from llama import convert

    ckpt, out = str(make_checkpoint("gqa")), str(tmp_path / "out")
    hf = str(convert.to_hf(ckpt, str(tokenizer_path), str(tmp_path / "hf")))
    lines = {
        "--groupsize": ["-m", "llama.quantize", "--ckpt_dir", ckpt, "--out_dir", out, "--mode", "int8", "--groupsize",
                        "16"],
        "--dry_run": ["-m", "llama.reshard", "--ckpt_dir", ckpt, "--out_dir", out, "--model_parallel_size", "1",
                      "--dry_run"],
        "--dtyp": ["-m", "llama.convert", "to_hf", "--ckpt_dir", ckpt, "--tokenizer_path", str(tokenizer_path),
                   "--out_dir", out, "--dtyp", "float32"],
        "--model-parallel": ["-m", "llama.convert", "from_hf", "--hf_dir", hf, "--out_dir", out, "--model-parallel",
                             "1"],
        "--quantise": ["example_text_completion.py", "--quantise", "int8", "--max_gen_len", "2"],
        "--system": ["example_chat_completion.py", "--system", "42", "--max_gen_len", "2"],
    }  # fmt: skip
    for flag, args in lines.items():
        proc = run_python(args)
        assert proc.returncode == 2, (flag, proc.stderr[-2000:])
        assert proc.stderr.startswith("ERROR: ") and flag in proc.stderr, (flag, proc.stderr[-2000:])
        assert proc.stdout == "" and not os.path.exists(out), flag


@pytest.mark.slow
@pytest.mark.parametrize(
    "module, command", [("llama.quantize", "main"), ("llama.reshard", "main"), ("llama.convert", "to_hf")]
)
def test_python_m_runs_one_copy_of_its_module(module, command, tmp_path):
    """`python -m llama.X` executes llama/X.py as __main__; the library importing llama.X afterwards (as it
    does llama.quantize when it opens a quantized folder) must get the same definitions, not run the file again.

    Checked on the file that defines the command (llama.convert re-exports llama.hf.convert's): every function
    of it exists once, however many modules hold it; a second run of the file would make a second of each."""
    (tmp_path / "sitecustomize.py").write_text(
        textwrap.dedent(f"""
        import atexit, inspect, sys

        def report():
            try:
                import {module}
            except Exception as e:
                print("IMPORT FAILED", repr(e), file=sys.stderr)
            file = inspect.getfile(getattr(sys.modules["{module}"], "{command}"))
            objects = {{}}
            for m in list(sys.modules.values()):
                for v in vars(m).values():
                    if inspect.isfunction(v) and v.__code__.co_filename == file:
                        objects.setdefault(v.__qualname__, set()).add(id(v))
            copies = sorted(name for name, ids in objects.items() if len(ids) > 1)
            print("FUNCTIONS", len(objects), "COPIES", copies, file=sys.stderr)

        atexit.register(report)
        """)
    )
    proc = run_python(["-m", module, "--help"], env={"PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])})
    assert proc.returncode == 0 and "SYNOPSIS" in proc.stdout + proc.stderr, proc.stderr[-2000:]
    assert "IMPORT FAILED" not in proc.stderr
    assert re.search(r"FUNCTIONS [1-9]\d* COPIES \[\]", proc.stderr), proc.stderr[-2000:]


@pytest.mark.slow
def test_quantizing_a_quantized_folder_is_refused_naming_its_scheme(make_checkpoint, tmp_path):
    """It was `RuntimeError: Tried to register an operator (llama::linear_int8...) multiple times`."""
    from llama.quantize import quantize_checkpoint

    quantized = quantize_checkpoint(make_checkpoint("gqa"), tmp_path / "int4", "int4", 16)
    proc = run_python(["-m", "llama.quantize", "--ckpt_dir", str(quantized), "--out_dir", str(tmp_path / "again"),
                       "--mode", "int8"])  # fmt: skip
    assert proc.returncode != 0
    assert f"{str(quantized)!r} is a quantized checkpoint (int4, group 16); quantize the float" in proc.stderr
    assert "register an operator" not in proc.stderr and not (tmp_path / "again").exists()
