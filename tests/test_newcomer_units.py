"""Issue 12 at unit level: messages and renders a new user reads (no model loaded)."""

from __future__ import annotations

import dataclasses
import io
import json
import re
import time

import pytest

from dvl_batch.config.spec import JobSpec
from dvl_batch.sink.output import describe_differences


def test_mismatch_names_each_changed_setting_with_old_and_new():
    spec = JobSpec.from_recipe(None, questions=["What is it?"], task="vqa")
    stored = json.loads(json.dumps(spec.output_identity("m")))  # job.json turns tuples into lists
    assert describe_differences(stored, spec.output_identity("m")) == "different settings"
    changed = dataclasses.replace(spec, generation=dataclasses.replace(spec.generation, max_new_tokens=8))
    message = describe_differences(stored, changed.output_identity("m"))
    assert message == "changed: generation.max_new_tokens 128 -> 8"
    other_model = describe_differences(stored, changed.output_identity("other"))
    assert '"m" -> "other"' in other_model and "generation.max_new_tokens 128 -> 8" in other_model
    assert "prompt" not in other_model


def _stats(**values):
    from dvl_batch.runtime.pipeline import RunStats

    return RunStats(**values)


def test_progress_bar_fits_80_columns(tmp_path):
    from rich.console import Console

    from dvl_batch.records import Shard
    from dvl_batch.runtime.progress import RichReporter

    from .conftest import many_shards

    paths = many_shards(tmp_path, 1, 12)
    console = Console(file=io.StringIO(), width=80, force_terminal=True, color_system=None)
    reporter = RichReporter(console=console)
    label = "caption with tiny:tiny-deepseek-vl-ebbdd6365c0123456789"
    reporter.start(1, 0, label, [Shard("shard-000000", str(paths[0]), "webdataset")])
    reporter.samples._thread.join(10)
    reporter.update(_stats(samples=1))  # the engine's first sample starts the clock...
    reporter.started -= 10  # ... 10 s ago
    reporter.update(_stats(samples=6, answered=5, images=5))
    reporter.close()
    render = io.StringIO()
    Console(file=render, width=80, force_terminal=True, color_system=None).print(reporter.progress.get_renderable())
    lines = [line for line in render.getvalue().splitlines() if line.strip()]
    assert len(lines) == 1 and len(lines[0]) <= 80, lines
    line = lines[0]
    assert line.startswith("caption ") and "━" in line
    assert "5/12 img" in line and "0.5 img/s" in line and "ETA 0m14s" in line


def test_one_shard_job_logs_progress_in_samples_and_images(tmp_path, cache_dir, capsys, monkeypatch):
    """A job of one shard shows answered samples and an ETA before the shard is done."""
    from dvl_batch import run
    from dvl_batch.runtime import assembly
    from dvl_batch.runtime.progress import LogReporter

    monkeypatch.setattr(assembly, "PROGRESS_SECONDS", 0.0)  # every answer reports: no race with a fast machine

    from .conftest import many_shards

    many_shards(tmp_path / "data", 1, 16)
    spec = JobSpec.from_recipe(None, inputs=[str(tmp_path / "data")], output=str(tmp_path / "out"), model="tiny",
                               max_new_tokens=8, workers=0, batch_size=2)
    result = run(spec, reporter=LogReporter(interval=0), cache_dir=cache_dir, offline=True, say=lambda text: None)
    assert result.stats.answered == 16 and result.stats.images == 16
    lines = [line for line in capsys.readouterr().err.splitlines() if " samples (" in line]
    moving = [line for line in lines if re.search(r"caption: ([1-9]|1[0-5])/16 samples", line) and "shards 0/1" in line]
    assert moving, lines
    assert all("ETA ?" not in line for line in moving), moving


def test_api_unknown_model_fails_in_seconds_and_writes_nothing(tmp_path, cache_dir, monkeypatch):
    from dvl_batch import run
    from dvl_batch.errors import UsageError

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    from .conftest import EXAMPLES

    out = tmp_path / "out"
    spec = JobSpec.from_recipe(None, inputs=[str(EXAMPLES / "shards")], output=str(out), model="some-org/not-cached")
    started = time.monotonic()
    with pytest.raises(UsageError, match="cannot use model some-org/not-cached: .*--model tiny"):
        run(spec, cache_dir=cache_dir, offline=False, say=lambda text: None)
    assert time.monotonic() - started < 15
    assert not out.exists()


def test_quantize_without_torchao_is_a_usage_error_before_out(tmp_path, cache_dir, monkeypatch):
    import sys

    from dvl_batch import run
    from dvl_batch.errors import UsageError

    from .conftest import EXAMPLES

    monkeypatch.setitem(sys.modules, "torchao", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    out = tmp_path / "out"
    spec = JobSpec.from_recipe(None, inputs=[str(EXAMPLES / "shards")], output=str(out), model="tiny",
                               quantize="int8wo", device="cpu")
    with pytest.raises(UsageError, match="--quantize needs torchao"):
        run(spec, cache_dir=cache_dir, offline=True, say=lambda text: None)
    assert not out.exists()


def test_api_run_prints_no_library_bars_or_warnings(tmp_path, cache_dir, capfd):
    from dvl_batch import run

    from .conftest import EXAMPLES

    spec = JobSpec.from_recipe(None, inputs=[str(EXAMPLES / "shards")], output=str(tmp_path / "out"), model="tiny",
                               max_new_tokens=2, workers=0, progress=False)
    run(spec, cache_dir=cache_dir, offline=True, say=lambda text: None)
    err = capfd.readouterr().err
    assert "Loading" not in err and "Warning" not in err, err


def test_sample_totals_come_from_parquet_footers_tar_headers_and_folder_lists(tmp_path):
    from dvl_batch.records import Shard
    from dvl_batch.runtime.progress import count_samples

    from .conftest import many_shards, write_parquet

    tar = many_shards(tmp_path, 1, 5)[0]
    table = write_parquet(tmp_path / "t.parquet", {"key": ["a", "b", "c"], "image": [b"x", b"y", b"z"]})
    assert count_samples(Shard("t", str(tar), "webdataset")) == 5
    assert count_samples(Shard("p", str(table), "parquet")) == 3
    assert count_samples(Shard("f", str(tmp_path), "folder", ("a.jpg", "b.jpg"))) == 2
    assert count_samples(Shard("u", "https://example.org/x.tar", "webdataset")) is None


def test_csv_questions_file_with_a_misspelt_column_names_it(tmp_path):
    from dvl_batch.errors import UsageError
    from dvl_batch.preprocess.prompts import load_questions_file

    path = tmp_path / "q.csv"
    path.write_text("key,qestion\nchelsea,What animal?\n")
    with pytest.raises(UsageError, match=r"found: key, qestion\) \(did you mean 'question'\?\)"):
        load_questions_file(path)
