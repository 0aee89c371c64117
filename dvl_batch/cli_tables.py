"""What the CLI prints at the end: the run summary and the status table (rich tables)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table


def print_summary(err: Console, result) -> None:
    """The run's summary table on stderr, or one line when there was nothing to do."""
    stats = result.stats
    if not stats.samples and not stats.shards_written and result.shards_done >= result.shards_total:
        err.print(f"nothing to do: all {result.shards_total} shards in {escape(str(result.out))} are done "
                  "(new shards are picked up when they appear; to answer them all again, delete it or pick another "
                  "output folder: --overwrite discards only results of other settings)")
        return
    seconds = max(result.seconds, 1e-9)
    table = Table(title="dvl-batch summary", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("output", str(result.out))
    table.add_row("model", result.model)
    table.add_row("shards", f"{result.shards_done}/{result.shards_total} done ({stats.shards_written} this run, {stats.shards_partial} partial)")
    table.add_row("images", f"{stats.images} in {stats.answered} samples")
    table.add_row("rows", f"{stats.rows} ({stats.error_rows} with errors)")
    if stats.duplicate_keys:
        table.add_row("duplicate keys (renamed KEY#N)", str(stats.duplicate_keys))
    table.add_row("time", f"{seconds:.1f} s")
    table.add_row("throughput", f"{stats.images / seconds:.2f} img/s, {stats.generated_tokens / seconds:.1f} tokens/s")
    engine = stats.engine
    if engine.get("oom_splits"):
        table.add_row("out-of-memory retries", str(int(engine["oom_splits"])))
    if stats.unreadable:
        table.add_row("shards not read (retried next run)", str(len(stats.unreadable)))
    if stats.decoder_restarts:
        table.add_row("decoder processes restarted", str(stats.decoder_restarts))
    start = [(name, engine.get(f"{name}_seconds", 0.0)) for name in ("load", "compile", "graph", "probe")]
    if any(seconds for _, seconds in start):
        table.add_row("start: load, compile, graphs, probe", " / ".join(f"{seconds:.1f}" for _, seconds in start) + " s")
    if engine.get("idle_seconds"):
        first = f" (first sample after {stats.first_sample_seconds:.1f} s)" if stats.first_sample_seconds else ""
        table.add_row("device idle (waiting for data)", f"{engine['idle_seconds']:.1f} s{first}")
    err.print(table)


def status_table(output: Path, report: dict[str, Any]) -> Table:
    """`dvl-batch status` as a two-column table."""
    table = Table(title=f"dvl-batch status: {output}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    total = report["shards_total"]
    table.add_row("model", str(report["model"]))
    table.add_row("task", str(report["task"]))
    table.add_row("shards", f"{report['shards_done']}/{total if total is not None else '?'} done ({report['partial_shards']} partial)")
    table.add_row("rows", f"{report['rows']} ({report['error_rows']} with errors)")
    if report["duplicate_keys"]:
        table.add_row("duplicate keys (renamed KEY#N)", str(report["duplicate_keys"]))
    if report["unreadable_parts"]:
        table.add_row("unreadable parts (redone by the next run)", "\n".join(report["unreadable_parts"]))
    if report["checkpoint_files"]:
        table.add_row("checkpointed", f"{report['checkpoint_rows']} rows of unfinished shards "
                      f"({report['checkpoint_files']} checkpoint files)")
    for note in report["notes"]:
        table.add_row("note", note)
    if report["world_size"] > 1:
        table.add_row("ranks", f"{report['ranks_reporting']} of {report['world_size']} have reported")
    for run_info in report["runs"]:
        label = f"rank {run_info.get('rank')}" if report["world_size"] > 1 else "last run"
        table.add_row(label, f"{_run_line(run_info)} (pid {run_info.get('pid')} on {run_info.get('host')})")
    return table


def _run_line(run_info: dict[str, Any]) -> str:
    """A progress record in words; a run that found nothing to do shows the rate of the last one that did work."""
    rate = run_info.get("images_per_second")
    working = run_info.get("images_per_second_working")
    if rate is not None and working is not None:  # records of older versions have no working rate
        rate = f"{rate} img/s ({working} img/s after the model load)"
    elif rate is not None:
        rate = f"{rate} img/s"
    if not run_info.get("nothing_to_do"):
        return f"{run_info.get('state')} at {run_info.get('updated')}, {rate}"
    earlier = f"; the last run with work (started {run_info.get('started')}) did {rate}" if rate is not None else ""
    return f"{run_info.get('state')} at {run_info.get('updated')}: nothing to do{earlier}"
