"""What `dvl-batch COMMAND --help` says about each option agrees with the code that reads it."""

from __future__ import annotations

import re

import typer
from typer.testing import CliRunner

from dvl_batch.cli import app
from dvl_batch.config.sections import DEVICE_PATTERN, ENGINES, QUANTIZE

COMMANDS = sorted(typer.main.get_command(app).commands)


def help_rows(command: str) -> dict[str, str]:
    """Each option's row of `COMMAND --help` (200 columns, as a user's wide terminal shows it),
    keyed by every one of its names, with the lines rich wrapped joined into one."""
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert result.exit_code == 0, result.output
    rows: list[list[str]] = []
    for line in result.output.splitlines():
        cell = line.strip().strip("│").strip()
        if re.match(r"│ +-", line.strip()):
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
