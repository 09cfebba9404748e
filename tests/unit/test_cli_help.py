"""``bray-archive``'s help pages, defaults, shell completion and version, as a user meets them."""

from __future__ import annotations

import argparse
import contextlib
import io
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bray.archiver.cli import _parser, main

ROOT = Path(__file__).resolve().parents[2]


def _pages() -> dict[str, argparse.ArgumentParser]:
    """Every (sub)command's parser by its command line ("publish", "server start", ...)."""
    pages: dict[str, argparse.ArgumentParser] = {}
    stack: list[tuple[str, argparse.ArgumentParser]] = [("", _parser())]
    while stack:
        name, parser = stack.pop()
        pages[name] = parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                stack.extend((f"{name} {sub}".strip(), p) for sub, p in action.choices.items())
    return pages


PAGES = _pages()


def help_text(command: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([*command.split(), "--help"]) == 0
    return out.getvalue()


@pytest.mark.parametrize("command", sorted(PAGES), ids=lambda c: c or "bray-archive")
def test_every_help_page_has_an_example_that_parses(command: str) -> None:
    text = help_text(command)
    assert "\nexample:\n" in text or "\nexamples:\n" in text, text
    examples = text.split("example", 1)[1].splitlines()[1:]
    commands = [line.strip() for line in examples if line.strip().startswith("bray-archive ")]
    assert commands, text
    for line in commands:  # each example is a valid command line for this parser, up to a shell operator
        words = shlex.split(line, comments=True)[1:]
        cut = [i for i, w in enumerate(words) if w in (">", "|", "||", "&&", ";")]
        argv = words[: cut[0]] if cut else words
        if argv and argv[-1] not in ("--help", "COMMAND"):
            with contextlib.redirect_stderr(io.StringIO()) as err:
                try:
                    _parser().parse_args([a.replace("~", "/home/u") for a in argv])
                except SystemExit:
                    pytest.fail(f"example {line!r} does not parse: {err.getvalue()}")


@pytest.mark.parametrize("command", sorted(c for c in PAGES if c), ids=str)
def test_every_option_and_argument_has_help(command: str) -> None:
    for action in PAGES[command]._actions:
        if isinstance(action, argparse._SubParsersAction):
            continue
        assert action.help, f"{command}: {action.option_strings or action.dest} has no help"


def test_flag_names_in_descriptions_exist() -> None:
    scale = help_text("scale")
    assert "--model-version" in scale and "--version)" not in scale
    usage = help_text("set-default").split("\n\n")[0]
    assert usage.rstrip().endswith("NAME VERSION"), usage


def test_version_has_one_source() -> None:
    import tomllib
    from importlib.metadata import version

    import bray

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    setuptools_cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools_cfg["dynamic"]["version"] == {"attr": "bray.__version__"}
    assert version("bray-serve") == bray.__version__
    assert f"## {bray.__version__}" in (ROOT / "CHANGELOG.md").read_text()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash to run the completion script")
@pytest.mark.parametrize(("words", "expected"), [
    ("bray-archive se", {"server", "set-default"}),
    ("bray-archive server st", {"start", "status", "stop"}),
    ("bray-archive publish --engine o", {"onnx"}),
    ("bray-archive scale policy --model-v", {"--model-version"}),
], ids=["commands", "server-verbs", "choices", "flags"])
def test_bash_completion_completes(words: str, expected: set[str]) -> None:
    script = subprocess.run([sys.executable, "-m", "bray.archiver", "completion", "bash"], capture_output=True,
                            text=True, timeout=60, check=True).stdout
    probe = (f'{script}\nCOMP_WORDS=({words}); COMP_CWORD={len(words.split()) - 1}; COMP_LINE="{words}"; '
             f'COMP_POINT={len(words)}; COMPREPLY=(); _shtab_bray_archive; printf "%s\\n" "${{COMPREPLY[@]}}"')
    done = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=60)
    assert set(done.stdout.split()) == expected, done.stderr


def test_cli_start_imports_neither_numpy_nor_requests() -> None:
    code = ("import sys; from bray.archiver.cli import main; main(['--version']); "
            "assert 'numpy' not in sys.modules and 'requests' not in sys.modules, sorted(sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


# How a command reads a flag it does not name as ``args.<dest>``: through the options that
# from_args builds (ServerOptions, PackOptions) or the locations they hold.
_READ_THROUGH = {
    "json": ("opts.json", "_emit(opts"),
    "timeout_s": ("opts.client()",),
    "store": ("opts.store(", "locations.store", "opts.locations"),
    "model_store": ("locations.model_store", "opts.locations"),
    "management": ("opts.client()", "locations.management_url", "opts.locations"),
    "key_file": ("opts.client()", "locations.key_file", "opts.locations"),
    "no_progress": ("pack.progress", "pack.as_kwargs()"),
    "force": ("pack.as_kwargs()",),  # PackOptions.force
    "workdir": ("_workdir(args)",),
    **{f"{api}_port": ('getattr(args, f"{name}_port")',) for api in ("inference", "management", "metrics")},
}


def _serving_dests() -> set[str]:
    from dataclasses import fields

    from bray.handlers.options import ServingOptions

    return {f.name for f in fields(ServingOptions)} | {"max_request_mb", "weight_sets_mb"}


@pytest.mark.parametrize("command", sorted(c for c in PAGES if "run" in PAGES[c]._defaults), ids=str)
def test_every_listed_flag_is_read_by_its_command(command: str) -> None:
    import inspect

    source = inspect.getsource(PAGES[command]._defaults["run"])
    unread = []
    for action in PAGES[command]._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        dest = action.dest
        ways = (f"args.{dest}", f"args, \"{dest}\"", *_READ_THROUGH.get(dest, ()))
        if dest in _serving_dests():
            ways += ("pack.serving", "pack.as_kwargs()")
        if not any(way in source for way in ways):
            unread.append(action.option_strings[0] if action.option_strings else dest)
    assert unread == [], f"bray-archive {command} --help lists {unread}, which the command never reads"


@pytest.mark.parametrize("command", ["dashboard", "kserve", "proxy"], ids=str)
def test_pages_list_no_flag_that_does_nothing_there(command: str) -> None:
    text = help_text(command)
    for flag in ("--timeout-s", "--set-default", "--wait-timeout-s") + (("--json",) if command != "kserve" else ()):
        assert flag not in text, f"{command}: {flag}"
