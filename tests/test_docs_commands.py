"""Every command the README and the docs pages show still composes: each
`cnnexp ...` / `python -m cnnexp ...` line in their code blocks is parsed as
Hydra parses it and composed against the real config and schema (without
training), and every `python -m cnnexp.<module>` names a module that exists.
A renamed key, group option or command breaks this test, not a reader."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser

from cnnexp.cli import config_dir

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND = re.compile(r"^\s*(?:\$ )?(?:python -m (cnnexp(?:\.\w+)?)|(cnnexp))(?=\s|$)(.*)$")
# Flags that are not overrides; searched values (interval, tag, ...) are the sweeper's to parse.
FLAGS = {"-m", "--multirun", "--help", "--hydra-help", "--info", "-h"}


def code_lines(text: str):
    """Lines inside fenced code blocks, with backslash continuations joined."""
    in_block, pending = False, ""
    for line in text.splitlines():
        if line.strip().startswith("```"):
            in_block, pending = not in_block, ""
            continue
        if not in_block:
            continue
        line = pending + line
        if line.rstrip().endswith("\\"):
            pending = line.rstrip()[:-1] + " "
            continue
        pending = ""
        yield line


def documented_commands():
    for page in PAGES:
        for line in code_lines(page.read_text()):
            match = COMMAND.match(line.split("  #")[0].split(" # ")[0])
            if match and "..." not in line:
                yield pytest.param(match.group(1) or match.group(2), match.group(3).strip(),
                                   id=f"{page.name}:{line.strip()[:60]}")


COMMANDS = list(documented_commands())


def test_the_docs_show_commands():
    assert len(COMMANDS) >= 20  # the parser still finds the pages' examples


def composable_overrides(arguments: str) -> list[str] | None:
    """The overrides of one command, one value of each sweep; None for a
    command that shows no config (--help, --cfg)."""
    words = [w for w in shlex.split(arguments) if w not in FLAGS]
    if "--cfg" in words:
        i = words.index("--cfg")
        words = words[:i] + words[i + 2:]
    overrides = []
    for override in OverridesParser.create().parse_overrides(words):
        if override.is_sweep_override():
            try:
                first = next(iter(override.sweep_string_iterator()))
            except Exception:  # interval(...), tag(...): a search space, sampled by the sweeper
                continue
            overrides.append(f"{override.get_key_element()}={first}")
        else:
            overrides.append(override.input_line)
    return overrides


@pytest.mark.parametrize("program, arguments", COMMANDS)
def test_a_documented_command_composes(program, arguments):
    if program != "cnnexp":
        assert importlib.util.find_spec(program) is not None, f"python -m {program}: no such module"
        return
    overrides = composable_overrides(arguments)
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    assert cfg.model._target_  # a whole config came out
