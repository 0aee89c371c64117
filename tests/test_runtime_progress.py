"""OUT/progress.json and the progress display: what they report about a run."""

from __future__ import annotations

import json

import pytest

from dvl_batch import JobSpec, run
from dvl_batch.inspect import collect_status
from dvl_batch.runtime.progress import NullReporter

from .conftest import EXAMPLES, REPO


def _run(out, cache_dir):
    spec = JobSpec.from_recipe(None, inputs=[str(EXAMPLES / "shards")], output=str(out), model="tiny",
                               max_new_tokens=2, workers=0, progress=False)
    return run(spec, reporter=NullReporter(), cache_dir=cache_dir, offline=True, say=lambda text: None)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, cache_dir):
    """One real run (tiny model, CPU) into an OUT that already holds a progress.json that does not parse."""
    out = tmp_path_factory.mktemp("progress") / "out"
    out.mkdir()
    (out / "progress.json").write_text("{not json")
    result = _run(out, cache_dir)
    return out, result, json.loads((out / "progress.json").read_text())


def test_a_run_replaces_a_progress_file_that_does_not_parse(finished):
    """progress.json reports on the last run; results live in the parts. A run writes it afresh
    (the README says so), and `status` then reads it."""
    out, result, record = finished
    assert result.stats.images == 6 and record["state"] == "finished" and record["images_this_run"] == 6
    assert collect_status(out)["runs"][0]["images_per_second"] == record["images_per_second"] > 0
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
        for key in ("started", "images_this_run", "rows_this_run", "images_per_second"):
            assert record[key] == first[key], key
    console = Console(width=400, record=True)
    console.print(status_table(out, collect_status(out)))
    assert f"nothing to do; the last run with work (started {first['started']}) did {first['images_per_second']} img/s" \
        in console.export_text()
    (out / "progress.json").write_text("{not json")  # only a report: replaced, with no rate to keep
    _run(out, cache_dir)
    record = json.loads((out / "progress.json").read_text())
    assert record["nothing_to_do"] is True and record["images_per_second"] is None
