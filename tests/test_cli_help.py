"""What `dvl-batch COMMAND --help` says about each option agrees with the code that reads it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from dvl_batch.cli import app
from dvl_batch.config.sections import DEVICE_PATTERN, ENGINES, QUANTIZE

REPO = Path(__file__).resolve().parents[1]
COMMANDS = sorted(typer.main.get_command(app).commands)


def help_rows(command: str) -> dict[str, str]:
    """Each option's row of `COMMAND --help` (200 columns, as a user's wide terminal shows it),
    keyed by every one of its names, with the lines rich wrapped joined into one."""
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert result.exit_code == 0, result.output
    rows: list[list[str]] = []
    for line in result.output.splitlines():
        cell = line.strip().strip("│").strip()
        if re.match(r"│ -", line.strip()):  # an option's first line; wrapped ones are indented further
            rows.append([cell])
        elif rows and line.strip().startswith("│") and cell:
            rows[-1].append(cell)
        elif not line.strip().startswith("│"):
            rows.append([])  # a panel ended: no continuation across it
    by_name = {}
    for row in filter(None, rows):
        text = " ".join(row)
        for name in re.findall(r"(?<!\S)(--?[a-z][\w-]*)", text.split("<", 1)[0]):
            by_name[name] = text
    return by_name


def test_quantize_help_names_torchao_only_for_the_formats_that_need_it():
    """fp8 is this package's own Fp8Linear (engine/quantize.py: MODES["fp8"].native); the int
    formats are torchao's: the help must not send an fp8 user to install torchao."""
    from dvl_batch.engine.quantize import MODES

    row = help_rows("caption")["--quantize"]
    own, torchao = row.split("torchao's", 1)
    for mode in QUANTIZE:
        assert mode in row, f"--quantize help leaves out {mode}"
    for mode, need in MODES.items():
        assert (mode in own) == need.native and (mode in torchao) != need.native, (mode, row)
    assert "no torchao" in own and "dvl-batch[quant]" in torchao


def test_engine_and_device_help_list_every_value_the_code_accepts():
    rows = help_rows("caption")
    for engine in ENGINES:
        assert engine in rows["--engine"], f"--engine help leaves out {engine}"
    devices = re.findall(r"\b(auto|cpu|mps|cuda:N|cuda)\b", rows["--device"].split("<str>", 1)[1])
    assert set(devices) >= {"auto", "cpu", "cuda", "cuda:N", "mps"}, rows["--device"]
    for device in ("auto", "cpu", "cuda", "cuda:0", "mps"):
        assert DEVICE_PATTERN.fullmatch(device)  # each value the help offers is one validation takes


# Options that do nothing unless given, so have no default to show (the README names them).
NO_DEFAULT = {"output", "recipe", "question", "questions_file", "question_field", "host_profile", "device_profile"}


def _shown_options(command: str) -> list:
    """A command's options that must show a default: all but --help, the exceptions above and
    on/off flags that are off unless given (`--strict`); --x/--no-x pairs do show theirs."""
    params = typer.main.get_command(app).commands[command].params
    return [p for p in params if p.param_type_name == "option" and p.name != "help" and p.name not in NO_DEFAULT
            and not (p.is_flag and not p.secondary_opts)]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_every_option_default(command):
    """The README promises `COMMAND --help` shows each option's default: job options default to
    None (a recipe's value stays), so their help must state the default the job gets."""
    rows = help_rows(command)
    missing = [p.opts[0] for p in _shown_options(command) if "[default: " not in rows[p.opts[0]]]
    assert not missing, f"{command} --help shows no default for {', '.join(missing)}"


def test_shown_job_defaults_are_the_specs_own():
    """Each plain default a job option shows is the JobSpec's default for its field."""
    from dvl_batch.cli_options import JOB_OPTIONS
    from dvl_batch.config.spec import JobSpec, option_path

    rows = help_rows("caption")
    params = {p.name: p for p in typer.main.get_command(app).commands["caption"].params}
    spec = JobSpec()
    checked = 0
    for name in JOB_OPTIONS:
        section, field = option_path(name).split(".")
        value = getattr(getattr(spec, section), field)
        param = params[name]
        if value in (None, ()) or (param.is_flag and not param.secondary_opts):
            continue
        if isinstance(value, bool):
            value = (param.opts if value else param.secondary_opts)[0].removeprefix("--")
        assert f"[default: {value}" in rows[param.opts[0]], (name, value, rows[param.opts[0]])
        checked += 1
    assert checked >= 20


def test_readme_names_the_options_that_show_no_default():
    readme = (REPO / "README.md").read_text()
    sentence = " ".join(readme[readme.index("COMMAND --help` shows each option's default"):].split("\n\n", 1)[0].split())
    params = {p.name: p for c in COMMANDS for p in typer.main.get_command(app).commands[c].params
              if p.param_type_name == "option"}
    for name in NO_DEFAULT:
        assert any(f"`{opt}`" in sentence for opt in params[name].opts), (name, sentence)
