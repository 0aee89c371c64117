"""Issue 12 end to end: what a new user sees from the real `dvl-batch` command on a CPU."""

from __future__ import annotations

import io
import json
import sys
import time

import pytest
from PIL import Image

from dvl_batch.errors import EXIT_LOCKED, EXIT_USAGE
from dvl_batch.sink.locks import RunLock

from .conftest import EXAMPLES, cli_env, run_cli, write_image_shard, write_tar

FAST = ["--max-new-tokens", "4", "--workers", "1", "--no-progress", "--model", "tiny"]


def big_jpeg() -> bytes:
    """Large enough for the draft decode and torch's resize (the path that warned about NumPy)."""
    buffer = io.BytesIO()
    Image.open(EXAMPLES / "images" / "chelsea.jpg").convert("RGB").resize((1600, 1200)).save(buffer, "JPEG")
    return buffer.getvalue()


def one_line_error(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


USAGE_CASES = {
    "unknown-hub-id": (["--model", "some-org/not-cached-anywhere"], "not in the Hugging Face cache"),
    "device-tpu": (["--device", "tpu"], "--device (model.device) must be auto, cpu, cuda or cuda:N"),
    "device-cuda-without-cuda": (["--device", "cuda", "--model", "tiny"], "CUDA is not available"),
    "no-image-field": (["--model", "tiny", "--image-field", "nope"], "--image-field nope matches no field"),
    "two-markers": (["--model", "tiny", "--prompt", "Compare <image> with <image>."], "2 <image> markers"),
}


@pytest.fixture(scope="module")
def started(tmp_path_factory, cache_dir, tiny_model_dir):
    """The runs of this module that share nothing (each its own folder and OUT; the tiny model is
    only read), started together (two at a time) on first use instead of one per test, one after
    another. Each test checks its own; the ones that must fail fast check the run's own seconds."""
    from .cli_processes import Overlapped

    folder = {name: tmp_path_factory.mktemp(name) for name in ("usage", "inputs", "hub", "stderr", "rerun", "recipe")}
    commands: dict[str, tuple[list[str], dict[str, str]]] = {}
    env = cli_env(cache_dir)

    def add(name: str, args: list[str], run_env: dict[str, str] = env) -> None:
        commands[name] = ([sys.executable, "-m", "dvl_batch", *args], run_env)

    import torch

    for case, (args, _) in USAGE_CASES.items():
        if not ("cuda" in args and torch.cuda.is_available()):  # that case is skipped on a CUDA machine
            (folder["usage"] / case).mkdir()
            add(f"usage-{case}", ["caption", str(EXAMPLES / "shards"), "-o", str(folder["usage"] / case / "out"), *args])
    inputs_out = folder["inputs"] / "out"
    inputs_out.mkdir()
    shard = write_tar(folder["inputs"] / "mpdata.tar", [(f"k{i}.mp", b"\x00" * 10) for i in range(5)])
    add("inputs-missing", ["caption", str(folder["inputs"] / "nowhere.tar"), "-o", str(inputs_out), *FAST])
    add("inputs-no-image", ["caption", str(shard), "-o", str(inputs_out), *FAST])
    add("inputs-hint", ["inspect", str(shard)])
    add("hub", ["caption", str(EXAMPLES / "shards"), "-o", str(folder["hub"] / "out"), "--model",
                "some-org/not-cached-anywhere"], {**env, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"})
    big = write_image_shard(folder["stderr"] / "data" / "big.tar",
                            {"big": big_jpeg(), "cat": (EXAMPLES / "images" / "chelsea.jpg").read_bytes()})
    add("stderr", ["caption", str(big), "-o", str(folder["stderr"] / "out"), "--max-new-tokens", "4", "--workers", "1",
                   "--model", "tiny"])
    add("rerun-first", ["caption", str(EXAMPLES / "shards"), "-o", str(folder["rerun"] / "out"), *FAST])
    recipe_out = folder["recipe"] / "out"
    typo = folder["recipe"] / "q.jsonl"
    typo.write_text(json.dumps({"key": "chelsea", "qestion": "What animal?"}) + "\n")
    other_keys = folder["recipe"] / "other.jsonl"
    other_keys.write_text(json.dumps({"key": "not-a-sample", "question": "What?"}) + "\n")
    add("recipe-vqa", ["caption", str(EXAMPLES / "shards"), "-o", str(recipe_out), "--recipe", "vqa-annotation", *FAST])
    add("recipe-misspelt", ["vqa", str(EXAMPLES / "shards"), "-o", str(recipe_out), "--questions-file", str(typo), *FAST])
    # the run that may write: its own OUT, so the refusals above are seen to write nothing
    add("recipe-warned", ["vqa", str(EXAMPLES / "shards"), "-o", str(folder["recipe"] / "warned-out"),
                          "--questions-file", str(other_keys), *FAST])
    timeouts = {"hub": 60}
    runs = Overlapped({name: (args, run_env, timeouts.get(name, 300)) for name, (args, run_env) in commands.items()})
    yield runs, folder
    runs.close()


@pytest.mark.parametrize("case", list(USAGE_CASES), ids=list(USAGE_CASES))
def test_usage_errors_exit_2_with_one_line_and_write_nothing_into_out(started, case):
    args, expected = USAGE_CASES[case]
    if "cuda" in args:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    runs, folder = started
    out = folder["usage"] / case / "out"
    result = runs.result(f"usage-{case}")
    assert runs.seconds[f"usage-{case}"] < 15
    assert result.returncode == EXIT_USAGE, result.stderr
    assert expected in one_line_error(result)
    assert not out.exists()


def test_bad_inputs_and_missing_image_field_write_nothing_into_an_existing_out(started):
    runs, folder = started
    out = folder["inputs"] / "out"
    missing = runs.result("inputs-missing")
    assert missing.returncode == EXIT_USAGE, missing.stderr
    one_line_error(missing)
    no_image = runs.result("inputs-no-image")
    assert no_image.returncode == EXIT_USAGE
    assert "mpdata.tar (fields found: mp); pass --image-field NAME" in one_line_error(no_image)
    assert list(out.iterdir()) == []
    hint = runs.result("inputs-hint")
    assert hint.returncode == 0 and "--image-field" in hint.stderr and "mp" in hint.stderr


def test_unreachable_hub_fails_in_seconds_with_one_line(started):
    runs, folder = started
    out = folder["hub"] / "out"
    result = runs.result("hub")  # HF_HUB_OFFLINE=0 and HF_ENDPOINT=http://127.0.0.1:9: nothing listens there
    assert runs.seconds["hub"] < 15
    assert result.returncode == EXIT_USAGE
    line = one_line_error(result)
    assert "some-org/not-cached-anywhere" in line and "--model /path/to/folder" in line and "--model tiny" in line
    assert not out.exists()


def test_cpu_run_stderr_holds_only_dvl_batch_lines(started):
    runs, _ = started
    result = runs.result("stderr")
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr and "warn" not in result.stderr.lower(), result.stderr
    assert "Loading" not in result.stderr
    before_summary = result.stderr.split("dvl-batch summary")[0].splitlines()
    assert before_summary and all(line.startswith("[dvl-batch]") for line in before_summary), result.stderr
    assert "first sample after" in result.stderr  # the summary tells a slow decoder start from a slow device


def test_rerun_with_nothing_to_do_loads_no_model(started, cache_dir):
    runs, folder = started
    out = folder["rerun"] / "out"
    first = runs.result("rerun-first")
    assert first.returncode == 0, first.stderr
    started = time.monotonic()
    again = run_cli(["caption", str(EXAMPLES / "shards"), "-o", str(out), *FAST], cache_dir)
    assert again.returncode == 0, again.stderr
    assert "nothing to do: all 1 shards" in again.stderr and "img/s" not in again.stderr
    assert "to answer them all again, delete it" in again.stderr, "the hint says what starts over (not --overwrite)"
    assert json.loads((out / "progress.json").read_text())["state"] == "finished"
    assert time.monotonic() - started < 60
    # a cron run that finds nothing new never imports the ML stack (torch alone took 1-4 s)
    code = (
        "import sys\nfrom dvl_batch.cli import run_cli\n"
        f"sys.argv = ['dvl-batch', 'caption', {str(EXAMPLES / 'shards')!r}, '-o', {str(out)!r}, *{FAST!r}]\n"
        "try:\n    run_cli()\nexcept SystemExit as exc:\n    print(exc.code, 'torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    import subprocess

    result = subprocess.run([sys.executable, "-c", code], env=cli_env(cache_dir), capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["0", "False", "False"], result.stdout + result.stderr
    assert "nothing to do" in result.stderr


def test_lock_refusal_comes_before_torch_is_imported(tmp_path, cache_dir):
    out = tmp_path / "out"
    out.mkdir()
    lock = RunLock(out / ".lock")
    lock.acquire()  # held by this (test) process: the subprocess must see it taken
    try:
        code = (
            "import sys\nfrom dvl_batch.cli import run_cli\n"
            f"sys.argv = ['dvl-batch', 'caption', {str(EXAMPLES / 'shards')!r}, '-o', {str(out)!r}, '--model', 'tiny']\n"
            "try:\n    run_cli()\nexcept SystemExit as exc:\n    print(exc.code, 'torch' in sys.modules, 'transformers' in sys.modules)\n"
        )
        import subprocess

        result = subprocess.run([sys.executable, "-c", code], env=cli_env(cache_dir), capture_output=True, text=True, timeout=60)
    finally:
        lock.release()
    assert result.stdout.split() == [str(EXIT_LOCKED), "False", "False"], result.stdout + result.stderr
    assert "another dvl-batch run holds" in result.stderr


def test_caption_with_a_vqa_recipe_and_bad_questions_files_are_refused_up_front(started):
    runs, folder = started
    out = folder["recipe"] / "out"
    recipe = runs.result("recipe-vqa")
    assert recipe.returncode == EXIT_USAGE and "would be ignored" in one_line_error(recipe)
    misspelt = runs.result("recipe-misspelt")
    assert misspelt.returncode == EXIT_USAGE
    assert "no 'question' or 'questions' field" in one_line_error(misspelt) and "did you mean 'question'" in misspelt.stderr
    assert not out.exists()
    warned = runs.result("recipe-warned")
    assert warned.returncode == 0, warned.stderr
    assert warned.stderr.count("is a key of") == 1 and "not-a-sample" in warned.stderr


def test_help_shows_defaults_and_a_readable_usage_line(cache_dir):
    import subprocess

    env = {**cli_env(cache_dir), "COLUMNS": "200"}
    result = subprocess.run([sys.executable, "-m", "dvl_batch", "caption", "--help"], env=env, capture_output=True, text=True)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "[OPTIONS] INPUT..." in text and "{inputs}" not in text
    assert "[default: 128]" in text and "[default: Describe this image.]" in text
    assert "[OPTIONS] RECIPE" in " ".join(run_cli(["run", "--help"], cache_dir).stdout.split())
