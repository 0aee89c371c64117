"""Bad configuration ends the real command with one `error:` line and exit code 2, never a traceback,
and before anything is written to OUT."""

from __future__ import annotations

import sys

import pytest

from dvl_batch.errors import EXIT_USAGE

from .conftest import EXAMPLES, cli_env, run_cli

SHARDS = str(EXAMPLES / "shards")


def recipe(tmp_path, text: str | bytes) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


def model_dir_without_processor(tmp_path) -> str:
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "deepseek_vl"}')
    (folder / "model.safetensors").write_bytes(b"")
    return str(folder)


CASES = {
    "unknown recipe key": (lambda t: ["-r", recipe(t, "batch:\n  batch_sise: 4\n")], "unknown key 'batch.batch_sise'"),
    "unknown recipe section": (lambda t: ["-r", recipe(t, "modle:\n  name: tiny\n")], "unknown key 'modle' (did you mean 'model'?)"),
    "recipe not yaml": (lambda t: ["-r", recipe(t, "batch: [unclosed\n")], "is not valid YAML"),
    "recipe missing": (lambda t: ["-r", str(t / "nowhere.yaml")], "recipe not found"),
    # a crash hunt's tracebacks
    "recipe not utf-8": (lambda t: ["-r", recipe(t, b"\xff\xfe\x00garbage")], "is not UTF-8 text"),
    "recipe nested too deep": (lambda t: ["-r", recipe(t, "x: " + "[" * 5000 + "]" * 5000)], "nested too deeply"),
    "recipe with number keys": (lambda t: ["-r", recipe(t, "1: 2\n")], "its keys must be section names, got 1"),
    "huge prefetch": (lambda t: ["--prefetch", str(10**20)], "data.prefetch must be in 1..1024"),
    "negative batch size": (lambda t: ["--batch-size", "-3"], "batch_size"),
    "negative batch size in recipe": (lambda t: ["-r", recipe(t, "batch:\n  batch_size: -3\n")], "batch_size"),
    "zero pixel limit": (lambda t: ["--max-image-pixels", "0"], "max_image_pixels must be >= 1"),
    "model dir without processor": (lambda t: ["--model", model_dir_without_processor(t)], "has no processor"),
    "model path missing": (lambda t: ["--model", str(t / "no-such-model")], "model not found"),
    "unknown kv dtype": (lambda t: ["--kv-dtype", "int3"], "model.kv_dtype must be one of auto, fp8"),
    "fp8 kv with generate": (lambda t: ["--kv-dtype", "fp8", "--engine", "generate"], "needs the slot engine"),
    "fp8 kv on cpu": (lambda t: ["--kv-dtype", "fp8", "--device", "cpu"], "--kv-dtype fp8 needs a CUDA GPU"),
}


@pytest.fixture(scope="module")
def started(tmp_path_factory, cache_dir):
    """Every case's run, each in its own folder, started together (two at a time) on first use
    instead of one per test, one after another; each test checks its own."""
    from .cli_processes import Overlapped

    folders = {case: tmp_path_factory.mktemp("case") for case in [*CASES, "missing", "brackets"]}
    commands = {case: ["caption", SHARDS, "-o", str(folders[case] / "out"), *CASES[case][0](folders[case])] for case in CASES}
    for number, (args, _) in enumerate(missing_cases(folders["missing"])):
        commands[f"missing-{number}"] = args
    commands["brackets"] = ["caption", str(bracketed(folders["brackets"])), "-o", str(folders["brackets"] / "out")]
    runs = Overlapped({name: ([sys.executable, "-m", "dvl_batch", *args], cli_env(cache_dir), 300)
                       for name, args in commands.items()})
    yield runs, folders
    runs.close()


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_configuration_is_one_line_and_exit_2(started, case):
    _, message = CASES[case]
    runs, folders = started
    out = folders[case] / "out"
    result = runs.result(case)
    assert result.returncode == EXIT_USAGE, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert not out.exists(), "nothing may be written for a usage error"


def missing_cases(folder) -> list[tuple[list[str], str]]:
    return [
        (["caption", str(folder / "missing"), "-o", str(folder / "a")], "input not found"),
        (["vqa", SHARDS, "-o", str(folder / "b")], "question"),
        (["caption", SHARDS], "no output folder"),
    ]


def bracketed(folder):
    return folder / "data[train]" / "[/x].tar"


def test_missing_input_and_missing_question(started):
    runs, folders = started
    for number, (_, message) in enumerate(missing_cases(folders["missing"])):
        result = runs.result(f"missing-{number}")
        assert result.returncode == EXIT_USAGE, result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0] and "Traceback" not in result.stderr, result.stderr


def test_malformed_option_value_is_a_usage_error(tmp_path, cache_dir):
    """Typer's own usage errors (its usage line and error box) also exit 2 without a traceback."""
    result = run_cli(["caption", SHARDS, "-o", str(tmp_path / "out"), "--batch-size", "many"], cache_dir)
    assert result.returncode == EXIT_USAGE and "Traceback" not in result.stderr
    assert "Invalid value for '--batch-size'" in result.stderr


def test_messages_with_brackets_are_printed_verbatim(started):
    runs, folders = started
    missing = bracketed(folders["brackets"])
    result = runs.result("brackets")
    assert result.returncode == EXIT_USAGE and "Traceback" not in result.stderr, result.stderr
    assert f"error: input not found: {missing}" in result.stderr


def test_a_cache_folder_that_cannot_be_made_is_one_usage_error(tmp_path):
    from dvl_batch.errors import UsageError
    from dvl_batch.tiny import ensure_tiny_model

    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="cannot build the offline model under .*set DVL_BATCH_CACHE to a writable folder"):
        ensure_tiny_model(tmp_path / "file")
