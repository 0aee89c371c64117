"""OUT/progress.json and the progress display: what they report about a run."""

from __future__ import annotations

import json

import pytest

from dvl_batch import JobSpec, run
from dvl_batch.inspect import collect_status
from dvl_batch.runtime.progress import NullReporter

from .conftest import EXAMPLES, REPO


class Recorder(NullReporter):
    """The reports a run's reporter gets: (samples taken, images answered) of each."""

    def __init__(self) -> None:
        super().__init__()
        self.reports: list[tuple[int, int]] = []

    def update(self, stats) -> None:
        self.reports.append((stats.samples, stats.images))


def _run(out, cache_dir, reporter=None):
    spec = JobSpec.from_recipe(None, inputs=[str(EXAMPLES / "shards")], output=str(out), model="tiny",
                               max_new_tokens=2, workers=0, progress=False)
    return run(spec, reporter=reporter or NullReporter(), cache_dir=cache_dir, offline=True, say=lambda text: None)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, cache_dir):
    """One real run (tiny model, CPU) into an OUT that already holds a progress.json that does not parse."""
    out = tmp_path_factory.mktemp("progress") / "out"
    out.mkdir()
    (out / "progress.json").write_text("{not json")
    recorder = Recorder()
    result = _run(out, cache_dir, recorder)
    result.reports = recorder.reports
    return out, result, json.loads((out / "progress.json").read_text())


def test_a_run_replaces_a_progress_file_that_does_not_parse(finished):
    """progress.json reports on the last run; results live in the parts. A run writes it afresh
    (the README says so), and `status` then reads it."""
    out, result, record = finished
    assert result.stats.images == 6 and record["state"] == "finished" and record["images_this_run"] == 6
    assert collect_status(out)["runs"][0]["images_per_second"] == record["images_per_second"] > 0
    # one clock for the whole-run rate: the summary's throughput (printed at the end) and status's
    summary_rate = result.stats.images / result.seconds
    assert record["images_per_second"] == pytest.approx(summary_rate, rel=0.05)
    # the working rate counts from the engine's first sample, so the model load does not dilute it
    assert record["images_per_second_working"] > record["images_per_second"]
    readme = " ".join((REPO / "README.md").read_text().split())
    promise = readme[readme.index("`OUT/progress*.json` only reports on the last run"):].split(". ", 1)[0]
    assert "a run writes it afresh whatever it holds" in promise and "`status` stops on one" in promise


def test_a_rerun_with_nothing_to_do_keeps_the_last_working_runs_figures(finished, cache_dir):
    """A cron rerun that finds nothing new must not leave `status` showing 0 img/s: its record
    says nothing was to do and carries the rate and counts of the run that did the work."""
    from rich.console import Console

    from dvl_batch.cli_tables import status_table

    out, _, first = finished
    for _ in range(2):  # the second no-op run carries the figures on again
        assert _run(out, cache_dir).stats.images == 0
        record = json.loads((out / "progress.json").read_text())
        assert record["nothing_to_do"] is True and record["state"] == "finished"
        for key in ("started", "images_this_run", "rows_this_run", "images_per_second", "images_per_second_working"):
            assert record[key] == first[key], key
    console = Console(width=400, record=True)
    console.print(status_table(out, collect_status(out)))
    assert (f"nothing to do; the last run with work (started {first['started']}) did {first['images_per_second']} img/s "
            f"({first['images_per_second_working']} img/s after the model load)") in console.export_text()
    (out / "progress.json").write_text("{not json")  # only a report: replaced, with no rate to keep
    _run(out, cache_dir)
    record = json.loads((out / "progress.json").read_text())
    assert record["nothing_to_do"] is True and record["images_per_second"] is None
    failed = {**first, "state": "failed", "images_this_run": 0, "images_per_second": 0.0}  # a run that answered nothing
    (out / "progress.json").write_text(json.dumps(failed))
    _run(out, cache_dir)
    record = json.loads((out / "progress.json").read_text())
    assert record["nothing_to_do"] is True and record["images_per_second"] is None, "a failed run's zeros are no rate"


class FakeTime:
    """time.monotonic for the progress clock, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def test_the_progress_rate_counts_from_the_engines_first_sample_not_from_the_model_load(monkeypatch):
    """The reporter starts before the model loads: a rate counted from then showed, on the first
    lines, the images answered over load + work time (20 images in 10 s after a 100 s load: 0.2
    img/s instead of 2.0). Reports before any sample was taken (Ray polls while its actors load)
    show no rate and an unknown ETA."""
    from dvl_batch.runtime import progress
    from dvl_batch.runtime.stats import RunStats

    clock = FakeTime()
    monkeypatch.setattr(progress, "time", clock)
    reporter = progress.LogReporter(interval=0)
    reporter.start(4, 0, "caption with tiny")
    clock.now += 50  # the model is loading
    assert reporter.line(RunStats()).endswith("0 error rows, 0.0 img/s, ETA ?")
    clock.now += 50
    reporter.update(RunStats(samples=1))  # the engine took its first sample: the clock starts
    clock.now += 10
    line = reporter.line(RunStats(samples=24, answered=20, images=20, shards_written=1))
    assert "2.0 img/s" in line and line.endswith("ETA 0m30s"), line  # 3 shards left at 10 s per shard


def test_engines_report_their_first_sample_before_its_answer(finished):
    """What starts the clock comes from the engine at once: the first report with a sample taken
    holds no answered image yet, so the rate's start is the engine's, not the first answer's."""
    _, result, _ = finished
    first = next(report for report in result.reports if report[0])
    assert first == (1, 0), result.reports[:5]
