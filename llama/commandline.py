"""Command lines that check every argument before they run: ``fire_checked`` and ``run_module``.

fire calls a function with the flags it recognises and complains about the others only once the function has
returned: ``python -m llama.quantize ... --groupsize 16`` wrote a whole folder with the default group size and
then exited 2. ``fire_checked`` reads the arguments as fire will, refuses an unknown flag (naming close
matches and the valid ones), a flag given twice, a surplus argument, or a value of the wrong type
(``--system 42`` arrives as an int, ``--max_seq_len abc`` as a str), and only then hands the same arguments to
``fire.Fire``. Only the standard library and fire are imported here.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any, Callable, NoReturn, Optional, Union

import fire
import fire.parser

HELP_FLAGS = ("-h", "--help")

# What each annotation accepts once fire has parsed a value (fire reads "42" as an int, "[1,2]" as a list):
# (test, description). A bool is an int in Python, but not a count or a number on a command line.
_ACCEPTS: dict[Any, tuple[Callable[[Any], bool], str]] = {
    str: (lambda v: isinstance(v, str), "text"),
    PurePath: (lambda v: isinstance(v, str), "a path"),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    bool: (lambda v: isinstance(v, bool), "True or False"),
    type(None): (lambda v: v is None, "None"),
}


@dataclass
class Given:
    """One parameter's value as fire will pass it, and how the command line gave it (for messages)."""

    value: Any
    text: str  # the value as typed
    flag: str  # "--mode", or "the argument 'x'" for a positional one
    bare: bool = False  # a flag without a value ("--compile"), which fire reads as True


def fire_checked(
    component: Callable[..., Any] | Mapping[str, Callable[..., Any]],
    args: Optional[Sequence[str]] = None,
    name: Optional[str] = None,
    serialize: Optional[Callable[[Any], Any]] = None,
) -> Any:
    """``fire.Fire(component, args)`` after ``checked_args``: a bad command line exits 2 before anything runs.

    component is a function, or a dict of them for subcommands (``python -m llama.convert to_hf ...``); args
    default to ``sys.argv[1:]``, name (for messages and help) to the script's file name. ``-h`` or ``--help``
    anywhere shows the help and runs nothing (fire itself would run a function whose parameters all have
    defaults first, and reads ``-h`` as a parameter's initial when exactly one starts with h).
    """
    args = list(sys.argv[1:] if args is None else args)
    name = name or os.path.basename(sys.argv[0])
    try:
        args = checked_args(component, args, name)
    except (ValueError, TypeError) as e:
        print(f"ERROR: {e}", file=sys.stderr)
        sys.exit(2)
    return fire.Fire(component, command=args, name=name, serialize=serialize)


def run_module(module: str, *commands: str) -> NoReturn:
    """Be ``python -m module``: fire_checked on module's function ``commands[0]`` (a dict of them when several:
    subcommands), then exit.

    ``python -m llama.quantize`` executes llama/quantize.py as a module named ``__main__``. Had that copy gone on
    to define its functions (it once also defined the quantized classes and registered torch operators), any
    ``import llama.quantize`` in the same process would execute the file again under its real name: two copies
    of everything, and torch refusing a second registration of an operator. So each command-line module calls this right
    after its imports, before it defines anything, and the command runs in the one ``llama.X`` module.
    """
    target = importlib.import_module(module)
    functions = {command: getattr(target, command) for command in commands}
    fire_checked(functions if len(commands) > 1 else functions[commands[0]], name=module)
    sys.exit(0)


def checked_args(
    component: Callable[..., Any] | Mapping[str, Callable[..., Any]], args: Sequence[str], name: str
) -> list[str]:
    """The arguments to give ``fire.Fire(component, ...)`` for args, once checked as fire will read them.

    Raises a ValueError for an unknown command or flag, a flag given twice or a surplus argument, and a
    TypeError for a value that does not fit its parameter's annotation (str, int, float, bool, a path, or
    Optional/Union of them; other annotations are not checked). A help flag anywhere gives ``[command] --help``.
    Arguments after fire's ``--`` (fire's own flags, e.g. ``-- --trace``) are left to fire.
    """
    args = list(args)
    fire_args, flag_args = fire.parser.SeparateFlagArgs(args)
    fire_flags = fire.parser.CreateParser().parse_known_args(flag_args)[0]
    separator = fire_flags.separator
    prefix: list[str] = []
    function = component
    if isinstance(component, Mapping):
        if not fire_args or fire_args[0] in HELP_FLAGS:
            return args  # fire lists the commands
        command = fire_args[0].replace("-", "_")
        if command not in component:
            raise ValueError(f"unknown command {fire_args[0]!r}{_did_you_mean(command, list(component), '')}; {name} "
                             f"takes one of {', '.join(component)} (see --help)")  # fmt: skip
        prefix, fire_args, function = [fire_args[0]], fire_args[1:], component[command]
        name = f"{name} {command}"
    if fire_flags.help or any(arg in HELP_FLAGS for arg in fire_args):
        return [*prefix, "--help"]
    if separator in fire_args:  # what follows fire's separator would go to the function's result
        after = fire_args[fire_args.index(separator) + 1 :]
        if after:
            raise ValueError(f"unexpected argument(s) after {separator!r}: {' '.join(after)}; {name} takes "
                             f"{_flag_list(function)} (see --help)")  # fmt: skip
        fire_args = fire_args[: fire_args.index(separator)]
    given = read_args(function, fire_args, name)
    check_types(function, given)
    return args


def read_args(function: Callable[..., Any], args: Sequence[str], name: str) -> dict[str, Given]:
    """The parameters of function that args give, read as fire reads them, or a ValueError naming what is wrong.

    As fire does: ``--flag value``, ``--flag=value``, ``-flag``, a bare ``--flag`` (True) and ``--noflag``
    (False) when followed by another flag or nothing, ``-f`` for the one parameter starting with f, hyphens
    read as underscores, and the arguments that are not flags fill the positional parameters not given by
    flag, in order. Values are parsed by fire's own parser.
    """
    signature = inspect.signature(function)
    params = [p for p in signature.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    names = [p.name for p in params]
    any_flag = any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values())
    given: dict[str, Given] = {}
    unknown: list[str] = []
    positional: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        index += 1
        if not _is_flag(arg):
            positional.append(arg)
            continue
        key, equals, text = arg.lstrip("-").partition("=")
        key = key.replace("-", "_")
        bare = not equals and (index == len(args) or _is_flag(args[index]))
        if not equals and not bare:
            text = args[index]
            index += 1
        keyword = _keyword(key, bare, names, any_flag, arg)
        if keyword is None:
            unknown.append(arg)
            continue
        if bare:  # fire: True, or False for noX when X is a parameter
            keyword, text = (key[2:], "False") if keyword not in names and key.startswith("no") else (keyword, "True")
        if keyword in given:
            raise ValueError(f"--{keyword} is given twice ({given[keyword].text} and {text}); give it once")
        given[keyword] = Given(fire.parser.DefaultParseValue(text), text, f"--{keyword}", bare)
    if unknown:
        hints = _type_hints(function)
        switches = [f"no{p.name}" for p in params if _accepted(hints.get(p.name)) == [_ACCEPTS[bool]]]
        hint = _did_you_mean(unknown[0].lstrip("-").partition("=")[0].replace("-", "_"), names + switches, "--")
        raise ValueError(f"unknown flag{'s' * (len(unknown) > 1)} {', '.join(unknown)}{hint}; {name} takes "
                         f"{_flag_list(function)} (see --help)")  # fmt: skip
    free = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in given]
    if len(positional) > len(free) and not any(p.kind == p.VAR_POSITIONAL for p in signature.parameters.values()):
        surplus = positional[len(free) :]
        raise ValueError(f"unexpected argument(s) {' '.join(map(repr, surplus))}: {name} takes "
                         f"{_flag_list(function)}, the first ones also by position (see --help)")  # fmt: skip
    for param, text in zip(free, positional):
        given[param] = Given(fire.parser.DefaultParseValue(text), text, f"the argument {text!r} (for {param})")
    return given


def check_types(function: Callable[..., Any], given: Mapping[str, Given]) -> None:
    """Raise a TypeError naming the first value in given that its parameter's annotation does not accept."""
    hints = _type_hints(function)
    for param, value in given.items():
        accepted = _accepted(hints.get(param))
        if accepted is None or any(test(value.value) for test, _ in accepted):
            continue
        wanted = " or ".join(description for _, description in accepted if description != "None") or "None"
        if value.bare:
            raise TypeError(f"{value.flag} needs a value ({wanted}), as in {value.flag}=VALUE")
        kind = type(value.value).__name__
        got = repr(value.text) if isinstance(value.value, str) else f"{value.text} (read as {kind})"
        message = f"{value.flag} must be {wanted}, not {got}"
        if any(description in ("text", "a path") for _, description in accepted):
            message += f"; to pass it as text, quote it for Python as well: --{param} '\"{value.text}\"'"
        elif any(description == "True or False" for _, description in accepted):
            message += f"; write --{param} or --no{param} alone, or --{param}=True / --{param}=False"
        raise TypeError(message)


def _keyword(key: str, bare: bool, names: list[str], any_flag: bool, arg: str) -> Optional[str]:
    """The parameter a flag's key names, as fire decides it (``noX`` only for a bare flag), or None."""
    if key in names or (bare and key.startswith("no") and key[2:] in names) or any_flag:
        return key
    if len(key) == 1:
        initial = [n for n in names if n.startswith(key)]
        if len(initial) > 1:
            raise ValueError(f"{arg} is ambiguous: it could be any of {', '.join('--' + n for n in initial)}")
        return initial[0] if initial else None
    return None


def _is_flag(arg: str) -> bool:
    """fire's test: a flag starts with -- or with - and a letter (so -1 is a value)."""
    return arg.startswith("--") or re.match(r"-[a-zA-Z]", arg) is not None


def _flag_list(function: Callable[..., Any]) -> str:
    params = inspect.signature(function).parameters.values()
    return ", ".join(f"--{p.name}" for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))


def _did_you_mean(key: str, names: Sequence[str], dashes: str) -> str:
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(dashes + n for n in close)}?)" if close else ""


def _type_hints(function: Callable[..., Any]) -> dict[str, Any]:
    """function's resolved annotations (its own module's names: decorators are unwrapped); {} if they cannot be
    resolved, so that nothing is checked rather than everything refused."""
    try:
        return typing.get_type_hints(inspect.unwrap(function))
    except Exception:  # an annotation naming something undefined, or not a type at all
        return {}


def _accepted(hint: Any) -> Optional[list[tuple[Callable[[Any], bool], str]]]:
    """The (test, description) pairs a value may pass for annotation hint; None where any value goes."""
    members = typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else (hint,)
    accepted = []
    for member in members:
        kind = PurePath if isinstance(member, type) and issubclass(member, PurePath) else member
        if kind not in _ACCEPTS:
            return None  # an annotation this module does not know (a list, Any...): fire's value stands
        accepted.append(_ACCEPTS[kind])
    return accepted
