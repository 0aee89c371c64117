"""The `dvl-batch` command line (Typer). Every run command builds a JobSpec and calls `api.run`.

Errors the user can fix print one line and exit with the documented code (README,
"Exit codes"); only bugs print a traceback.
"""

from __future__ import annotations

import functools
import json
import signal
import sys
from collections.abc import Callable
from inspect import Parameter, Signature, signature
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ._version import __version__
from .cli_options import (
    JOB_OPTIONS,
    BatchSize,
    Device,
    ImageField,
    InputOption,
    Inputs,
    KeyField,
    MaxPromptTokens,
    Model,
    Output,
    PrefillBatch,
    Prompt,
    Question,
    QuestionField,
    QuestionsFile,
    Recipe,
    SystemPrompt,
    Task,
    Workers,
)
from .errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, DvlError, UsageError

app = typer.Typer(
    name="dvl-batch",
    help="Caption and question-answer millions of images with DeepSeek-VL: shards in, resumable parquet out.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, soft_wrap=True)  # one-line messages stay one line in logs
out_console = Console()

def _execute(task: str | None, inputs: list[str] | None, recipe: Path | str | None, options: dict[str, Any]) -> None:
    """One job command: the shared spec builder, then the shared run path (api.run)."""
    from .config.spec import spec_from_recipe

    if task:
        options["task"] = task
    spec = spec_from_recipe(recipe or None, inputs=inputs, **options)
    from .api import ErrorRowsError, run  # torch and transformers load only once the options are known to be valid
    from .runtime.worker import quiet_transformers

    quiet_transformers()
    try:
        result = run(spec, say=lambda text: err.print(f"[yellow]{escape(text)}[/]"))
    except ErrorRowsError as exc:
        _print_summary(exc.result)
        err.print(f"[red]strict mode[/]: {escape(str(exc).removeprefix('strict mode: '))}")
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:  # a second Ctrl-C/SIGTERM, or one outside the job's own handling
        err.print(f"[red]aborted[/]: parts already in {escape(spec.output.path)}/parts are complete; rerun the same command to resume")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    _print_summary(result)
    unreadable = result.stats.unreadable
    for line in unreadable:
        err.print(f"[red]not read[/]: {escape(line)}")
    if unreadable and not result.interrupted:
        err.print(f"[red]error:[/] {len(unreadable)} shards could not be read and have no part; "
                  "rerun the same command to retry them")
        raise typer.Exit(EXIT_FAILED)
    if result.interrupted:
        err.print(f"[red]interrupted[/]: {result.stats.rows} rows saved this run ({result.stats.shards_written} shards "
                  "finished); rerun the same command to resume")
        raise typer.Exit(EXIT_INTERRUPTED)


def _print_summary(result) -> None:
    stats = result.stats
    seconds = max(result.seconds, 1e-9)
    table = Table(title="dvl-batch summary", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("output", str(result.out))
    table.add_row("model", result.model)
    table.add_row("shards", f"{result.shards_done}/{result.shards_total} done ({stats.shards_written} this run, {stats.shards_partial} partial)")
    table.add_row("images", str(stats.samples))
    table.add_row("rows", f"{stats.rows} ({stats.error_rows} with errors)")
    table.add_row("time", f"{seconds:.1f} s")
    table.add_row("throughput", f"{stats.samples / seconds:.2f} img/s, {stats.generated_tokens / seconds:.1f} tokens/s")
    engine = stats.engine
    if engine.get("oom_splits"):
        table.add_row("out-of-memory retries", str(int(engine["oom_splits"])))
    if stats.unreadable:
        table.add_row("shards not read (retried next run)", str(len(stats.unreadable)))
    if stats.decoder_restarts:
        table.add_row("decoder processes restarted", str(stats.decoder_restarts))
    if engine.get("idle_seconds"):
        table.add_row("device idle (waiting for data)", f"{engine['idle_seconds']:.1f} s")
    err.print(table)


def _version(value: bool) -> None:
    if value:
        out_console.print(f"dvl-batch {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool | None, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")] = None,
) -> None:
    """Caption and question-answer millions of images with DeepSeek-VL."""


def job_command(task: str | None) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Make a job command from a function that only declares its own parameters and help.

    Typer reads a command's options from its signature: the shared JOB_OPTIONS are appended
    to the function's own (spelled out in three signatures, they drifted apart), and every
    job command runs the same way: `_execute(task, inputs, recipe, all other options)`.
    """

    def decorate(function: Callable[..., None]) -> Callable[..., None]:
        own = list(signature(function, eval_str=True).parameters.values())
        shared = [Parameter(name, Parameter.KEYWORD_ONLY, default=None, annotation=annotation)
                  for name, annotation in JOB_OPTIONS.items()]

        @functools.wraps(function)
        def command(**options: Any) -> None:
            _execute(task, options.pop("inputs"), options.pop("recipe"), options)

        command.__signature__ = Signature(own + shared)  # type: ignore[attr-defined]
        return command

    return decorate


@app.command()
@job_command("caption")
def caption(
    inputs: Inputs,
    output: Output = None,
    recipe: Recipe = None,
    model: Model = None,
    prompt: Prompt = None,
    system_prompt: SystemPrompt = None,
    max_prompt_tokens: MaxPromptTokens = None,
) -> None:
    """Write a caption for every image. Rerun the same command to resume."""


@app.command()
@job_command("vqa")
def vqa(
    inputs: Inputs,
    output: Output = None,
    question: Question = None,
    questions_file: QuestionsFile = None,
    question_field: QuestionField = None,
    recipe: Recipe = None,
    model: Model = None,
    system_prompt: SystemPrompt = None,
    max_prompt_tokens: MaxPromptTokens = None,
) -> None:
    """Answer questions about every image: one row per (image, question)."""


@app.command("run")
@job_command(None)  # the task comes from the recipe or --task
def run_recipe(
    recipe: Annotated[str, typer.Argument(help="A bundled recipe name (see `dvl-batch recipes`) or a YAML file.", show_default=False)],
    inputs: InputOption = None,
    output: Output = None,
    task: Task = None,
    prompt: Prompt = None,
    question: Question = None,
    questions_file: QuestionsFile = None,
    question_field: QuestionField = None,
    system_prompt: SystemPrompt = None,
    max_prompt_tokens: MaxPromptTokens = None,
    model: Model = None,
) -> None:
    """Run a recipe: `dvl-batch run short-caption -i SHARDS -o OUT`. Options override the recipe."""


@app.command("recipes")
def list_recipes(
    name: Annotated[str | None, typer.Argument(help="Print this recipe's YAML instead of the list.", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the bundled recipes (or print one) for `dvl-batch run RECIPE`."""
    from .config.recipes import bundled_recipes, find_recipe

    if name:
        typer.echo(find_recipe(name).read_text(), nl=False)
        return
    found = bundled_recipes()
    if as_json:
        out_console.print_json(json.dumps([{"name": r.name, "task": r.task, "description": r.description, "path": str(r.path)} for r in found]))
        return
    table = Table(title="Bundled recipes: dvl-batch run NAME -i INPUT -o OUT", title_justify="left")
    for column in ("name", "task", "description"):
        table.add_column(column)
    for info in found:
        table.add_row(info.name, info.task, info.description)
    out_console.print(table)


@app.command()
def status(
    output: Annotated[Path, typer.Argument(help="An output folder of a run.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Shards done/total, rows, error rows and throughput of an output folder."""
    from .inspect import collect_status

    report = collect_status(output)
    if as_json:
        out_console.print_json(json.dumps(report))
        return
    table = Table(title=f"dvl-batch status: {output}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    total = report["shards_total"]
    table.add_row("model", str(report["model"]))
    table.add_row("task", str(report["task"]))
    table.add_row("shards", f"{report['shards_done']}/{total if total is not None else '?'} done ({report['partial_shards']} partial)")
    table.add_row("rows", f"{report['rows']} ({report['error_rows']} with errors)")
    if report["checkpoint_files"]:
        table.add_row("checkpointed", f"{report['checkpoint_rows']} rows of unfinished shards "
                      f"({report['checkpoint_files']} checkpoint files)")
    if report["world_size"] > 1:
        table.add_row("ranks", f"{report['ranks_reporting']} of {report['world_size']} have reported")
    for run_info in report["runs"]:
        label = f"rank {run_info.get('rank')}" if report["world_size"] > 1 else "last run"
        table.add_row(
            label,
            f"{run_info.get('state')} at {run_info.get('updated')}, {run_info.get('images_per_second')} img/s "
            f"(pid {run_info.get('pid')} on {run_info.get('host')})",
        )
    out_console.print(table)


@app.command()
def inspect(
    inputs: Inputs,
    image_field: ImageField = None,
    key_field: KeyField = None,
    shard_size: Annotated[int, typer.Option(help="Images per shard for plain folders.")] = 1000,
    max_shards: Annotated[int | None, typer.Option(help="Read only the first N shards (default: all).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List shards, sample counts and fields of the inputs, without loading a model."""
    from .inspect import inspect_inputs

    shards, reports = inspect_inputs(inputs, image_field, key_field, shard_size, max_shards)
    rows = [
        {
            "shard": r.shard.id,
            "format": r.shard.format,
            "url": r.shard.url,
            "samples": r.samples,
            "error_samples": r.errors,
            "partial": r.partial,
            "message": r.message,
            "fields": dict(r.fields),
            "image_fields": dict(r.image_fields),
        }
        for r in reports
    ]
    summary = {"shards": len(shards), "inspected": len(reports), "samples": sum(r.samples for r in reports), "details": rows}
    if as_json:
        out_console.print_json(json.dumps(summary))
        return
    table = Table(title=f"{len(shards)} shards, {summary['samples']} samples in the {len(reports)} read", title_justify="left")
    for column in ("shard", "format", "samples", "errors", "image field(s)", "fields found", "note"):
        table.add_column(column)
    for r in reports:
        note = ("partial: " if r.partial else "") + (r.message or "")
        table.add_row(
            r.shard.id, r.shard.format, str(r.samples), str(r.errors), ", ".join(sorted(r.image_fields)) or "-",
            ", ".join(sorted(r.fields)), note,
        )
    out_console.print(table)


@app.command()
def bench(
    profile: Annotated[str, typer.Option(
        help="caption-varlen, vqa (5 questions per image), both, or preprocess (CPU decode rate per core, no model).",
    )] = "caption-varlen",
    shape: Annotated[str, typer.Option(help="real-1.3b (random weights of the checkpoint's shape) or tiny.")] = "real-1.3b",
    requests: Annotated[int, typer.Option(help="Images in the run (>= 2048 for the reference numbers).")] = 2048,
    max_new_tokens: Annotated[int, typer.Option(help="Answer length cap; the stop schedule ends most answers earlier.")] = 128,
    hf_batch_size: Annotated[list[int] | None, typer.Option(help="generate batch sizes to try (best is reported; repeatable).")] = None,
    hf_cache: Annotated[str, typer.Option(help="static (compiled decode) or dynamic cache for the generate baseline.")] = "static",
    skip_hf: Annotated[bool, typer.Option("--skip-hf", help="Only run dvl-batch.")] = False,
    batch_size: BatchSize = None,
    prefill_batch: PrefillBatch = None,
    cuda_graphs: Annotated[bool, typer.Option("--cuda-graphs/--no-cuda-graphs")] = True,
    compile: Annotated[bool, typer.Option("--compile/--no-compile")] = True,
    triton_attention: Annotated[bool, typer.Option("--triton-attention/--no-triton-attention")] = True,
    workers: Workers = None,
    images_per_shard: Annotated[int, typer.Option(help="Images per generated webdataset shard.")] = 256,
    image_side: Annotated[int, typer.Option(help="Long side of the generated JPEGs.")] = 1024,
    data_dir: Annotated[str | None, typer.Option(help="Where to write (or reuse) the generated shards.")] = None,
    device: Device = None,
    out: Annotated[str, typer.Option("--out", help="JSON results file.")] = "bench.json",
    host_profile: Annotated[str | None, typer.Option(help="Write a cProfile of dvl-batch's host side to this file.")] = None,
) -> None:
    """Benchmark dvl-batch end to end against transformers' generate on the same inputs (prints a table, writes JSON)."""
    from .bench import BenchConfig, format_preprocess_table, format_table, run_bench, run_preprocess_bench
    from .config.launch import default_cache_dir
    from .runtime.worker import quiet_transformers

    quiet_transformers()
    cfg = BenchConfig(
        profile=profile, shape=shape, requests=requests, max_new_tokens=max_new_tokens,
        hf_batch_sizes=tuple(hf_batch_size or [256]), hf_cache=hf_cache, skip_hf=skip_hf, batch_size=batch_size,
        prefill_batch=prefill_batch, workers=workers, images_per_shard=images_per_shard, image_side=image_side,
        data_dir=data_dir, device=device or "auto", cuda_graphs=cuda_graphs, compile=compile,
        triton_attention=triton_attention, host_profile=host_profile, out=out,
    )
    if profile not in ("caption-varlen", "vqa", "both", "preprocess") or shape not in ("real-1.3b", "tiny"):
        raise UsageError("--profile must be caption-varlen, vqa, both or preprocess; --shape real-1.3b or tiny")
    if profile == "preprocess":
        print(format_preprocess_table(run_preprocess_bench(cfg, default_cache_dir())))
    else:
        print(format_table(run_bench(cfg, default_cache_dir())))
    err.print(f"results written to {out}")


def _terminate_as_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run_cli() -> None:
    """Console-script entry: map our errors to one line and an exit code."""
    # SIGTERM outside a job's own handling (start-up, model loading) ends the run like
    # Ctrl-C: a message and exit 130 instead of a silent death. api.run installs the
    # graceful "finish in-flight shards" handler for the job itself.
    signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    try:
        app()
    except DvlError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")  # paths and messages may hold [brackets]
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("[red]aborted[/]: parts already written are complete; rerun to resume")
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(EXIT_OK)
