"""The `dvl-batch` command line (Typer). Every run command builds a JobSpec and calls `api.run`.

Errors the user can fix print one line and exit with the documented code (README,
"Exit codes"); only bugs print a traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import os
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

from . import __version__
from .errors import EXIT_ERROR_ROWS, EXIT_INTERRUPTED, EXIT_OK, DvlError, UsageError

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # decoder workers fork after the tokenizer loads

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

# Option name -> JobSpec field. Options left unset (None) keep the recipe's or the default value.
OPTION_PATHS = {
    "model": "model.name",
    "revision": "model.revision",
    "device": "model.device",
    "dtype": "model.dtype",
    "attn_implementation": "model.attn_implementation",
    "quantize": "model.quantize",
    "device_map": "model.device_map",
    "prompt": "prompt.prompt",
    "question": "prompt.questions",
    "questions_file": "prompt.questions_file",
    "question_field": "prompt.question_field",
    "system_prompt": "prompt.system_prompt",
    "max_prompt_tokens": "prompt.max_prompt_tokens",
    "task": "prompt.task",
    "max_new_tokens": "generation.max_new_tokens",
    "temperature": "generation.temperature",
    "top_p": "generation.top_p",
    "seed": "generation.seed",
    "image_field": "data.image_field",
    "key_field": "data.key_field",
    "workers": "data.workers",
    "prefetch": "data.prefetch",
    "fast_decode": "data.fast_decode",
    "max_image_pixels": "data.max_image_pixels",
    "limit": "data.limit",
    "shard_size": "data.shard_size",
    "engine": "batch.engine",
    "batch_size": "batch.batch_size",
    "token_budget": "batch.token_budget",
    "prefill_batch": "batch.prefill_batch",
    "cuda_graphs": "batch.cuda_graphs",
    "compile": "batch.compile",
    "triton_attention": "batch.triton_attention",
    "output": "output.path",
    "overwrite": "output.overwrite",
    "strict": "output.strict",
    "runner": "run.runner",
    "gpus": "run.gpus",
    "rank": "run.rank",
    "world_size": "run.world_size",
    "ray_address": "run.ray_address",
    "progress": "run.progress",
}

Inputs = Annotated[list[str], typer.Argument(help="Webdataset .tar/.tgz shards, parquet files, image folders, or brace patterns like 'shards/{000..099}.tar'.", show_default=False)]
Output = Annotated[str | None, typer.Option("--output", "-o", help="Output folder: parts/*.parquet, job.json, progress.json.", show_default=False)]
Model = Annotated[str | None, typer.Option("--model", "-m", help="Hub id or local folder; 'tiny' for the offline test model. Default: deepseek-community/deepseek-vl-1.3b-chat, or the tiny model when it is unreachable.", rich_help_panel="Model")]
Revision = Annotated[str | None, typer.Option(help="Hub revision (branch, tag or commit).", rich_help_panel="Model")]
Device = Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N (default: cuda when available).", rich_help_panel="Model")]
Dtype = Annotated[str | None, typer.Option(help="auto, bfloat16, float16 or float32 (auto: bfloat16 on GPU, float32 on CPU).", rich_help_panel="Model")]
Attn = Annotated[str | None, typer.Option("--attn-implementation", help="Attention for the vision tower and generate engine: sdpa, eager, flash_attention_2.", rich_help_panel="Model")]
Quantize = Annotated[str | None, typer.Option(help="none, int4wo, int8wo, int8dq or fp8 (torchao).", rich_help_panel="Model")]
DeviceMap = Annotated[str | None, typer.Option(help="'auto' spreads a too-large model over GPUs (uses the generate engine).", rich_help_panel="Model")]
Prompt = Annotated[str | None, typer.Option("--prompt", "-p", help="Caption instruction.", rich_help_panel="Prompt")]
Question = Annotated[list[str] | None, typer.Option("--question", "-q", help="A question asked about every image (repeatable).", rich_help_panel="Prompt")]
QuestionsFile = Annotated[str | None, typer.Option(help="JSONL ({key, question|questions}) or CSV (key,question) with per-image questions.", rich_help_panel="Prompt")]
QuestionField = Annotated[str | None, typer.Option(help="Input field/column holding each sample's question (e.g. 'question', 'txt', 'json.question').", rich_help_panel="Prompt")]
SystemPrompt = Annotated[str | None, typer.Option(help="Replace the checkpoint's system prompt.", rich_help_panel="Prompt")]
MaxNew = Annotated[int | None, typer.Option(help="Longest answer in tokens. [default: 128]", rich_help_panel="Generation")]
Temperature = Annotated[float | None, typer.Option(help="0 for greedy decoding (default); > 0 samples.", rich_help_panel="Generation")]
TopP = Annotated[float | None, typer.Option(help="Nucleus sampling threshold.", rich_help_panel="Generation")]
Seed = Annotated[int | None, typer.Option(help="Sampling seed.", rich_help_panel="Generation")]
ImageField = Annotated[str | None, typer.Option(help="Image field/column (auto-detected); comma-separated for multi-image samples.", rich_help_panel="Data")]
KeyField = Annotated[str | None, typer.Option(help="Parquet column with sample keys (default: key/__key__/id, else row number).", rich_help_panel="Data")]
Workers = Annotated[int | None, typer.Option("--workers", "-j", help="Decoder processes (default: CPU count - 1; 0 decodes in-process).", rich_help_panel="Data")]
Prefetch = Annotated[int | None, typer.Option(help="Samples buffered per decoder process.", rich_help_panel="Data")]
FastDecode = Annotated[bool | None, typer.Option("--fast-decode/--exact-decode", help="Fast: JPEG draft decoding + normalisation on device. Exact: the checkpoint's image processor on full decodes.", rich_help_panel="Data")]
MaxPixels = Annotated[int | None, typer.Option(help="Images with more pixels become error rows (decompression-bomb guard).", rich_help_panel="Data")]
Limit = Annotated[int | None, typer.Option(help="Stop after this many samples (smoke tests; counted per engine process with --gpus/--runner ray).", rich_help_panel="Data")]
ShardSize = Annotated[int | None, typer.Option(help="Images per shard for plain folders.", rich_help_panel="Data")]
Engine = Annotated[str | None, typer.Option(help="continuous (slot scheduler, default) or generate (transformers' generate).", rich_help_panel="Batching")]
BatchSize = Annotated[int | None, typer.Option("--batch-size", "-b", help="Concurrent sequences (default: fit to GPU memory; 8 on CPU).", rich_help_panel="Batching")]
TokenBudget = Annotated[int | None, typer.Option(help="Most prompt tokens per generate batch.", rich_help_panel="Batching")]
PrefillBatch = Annotated[int | None, typer.Option(help="Images encoded and prefilled per step.", rich_help_panel="Batching")]
CudaGraphs = Annotated[bool | None, typer.Option("--cuda-graphs/--no-cuda-graphs", help="Capture the decode step as a CUDA graph.", rich_help_panel="Batching")]
Compile = Annotated[bool | None, typer.Option("--compile/--no-compile", help="torch.compile the slot engine's passes on CUDA (one-time cost of about a minute).", rich_help_panel="Batching")]
Overwrite = Annotated[bool | None, typer.Option("--overwrite", help="Discard results in OUT from a run with different settings.", rich_help_panel="Output")]
Strict = Annotated[bool | None, typer.Option("--strict", help=f"Exit with code {EXIT_ERROR_ROWS} if any row has an error.", rich_help_panel="Output")]
Runner = Annotated[str | None, typer.Option(help="local (default) or ray.", rich_help_panel="Scale-out")]
Gpus = Annotated[str | None, typer.Option(help="'all' or '0,1,...': one engine process per GPU ('cpu,cpu': CPU engine processes). With --runner ray: 'all' GPUs of the cluster, a number of GPU actors, or 'cpu,cpu'.", rich_help_panel="Scale-out")]
Rank = Annotated[int | None, typer.Option(help="This worker's index for static partitioning (default: RANK, or SLURM_PROCID / the SLURM array index).", rich_help_panel="Scale-out")]
WorldSize = Annotated[int | None, typer.Option(help="Number of independent workers (default: WORLD_SIZE, or SLURM_NTASKS / the SLURM array size).", rich_help_panel="Scale-out")]
RayAddress = Annotated[str | None, typer.Option(help="Ray cluster address for --runner ray (default: RAY_ADDRESS, else a local Ray instance).", rich_help_panel="Scale-out")]
Progress = Annotated[bool | None, typer.Option("--progress/--no-progress", help="Progress bar (terminal) or log lines (no terminal).", rich_help_panel="Output")]
Recipe = Annotated[Path | None, typer.Option("--recipe", "-r", help="Recipe: a bundled name (see `dvl-batch recipes`) or a YAML file; options given here override it.", show_default=False)]
MaxPromptTokens = Annotated[int | None, typer.Option(help="Longest prompt in tokens: question text is cut to fit, image tokens never (a sample whose images alone exceed it becomes an error row).", rich_help_panel="Prompt")]
Task = Annotated[str | None, typer.Option(help="caption or vqa (default: the recipe's).", rich_help_panel="Prompt")]
InputOption = Annotated[list[str] | None, typer.Option("--input", "-i", help="Shards, parquet files, image folders or brace patterns (repeatable; default: the recipe's data.inputs).", show_default=False)]


def _env_int(*names: str) -> int | None:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError as exc:
                raise UsageError(f"environment variable {name}={value!r} is not an integer") from exc
    return None


def rank_from_environment() -> tuple[int | None, int | None]:
    """(rank, world size) as the launcher set them: torchrun's RANK/WORLD_SIZE, else SLURM.

    A SLURM job array (--array=0-N, contiguous) counts each element as a rank, times the
    tasks of each element; a plain SLURM step uses SLURM_PROCID of SLURM_NTASKS.
    """
    if _env_int("RANK") is not None or _env_int("WORLD_SIZE") is not None:
        return _env_int("RANK"), _env_int("WORLD_SIZE")
    procid, ntasks = _env_int("SLURM_PROCID"), _env_int("SLURM_NTASKS")
    array_count = _env_int("SLURM_ARRAY_TASK_COUNT")
    if array_count:
        index = (_env_int("SLURM_ARRAY_TASK_ID") or 0) - (_env_int("SLURM_ARRAY_TASK_MIN") or 0)
        return index * (ntasks or 1) + (procid or 0), array_count * (ntasks or 1)
    return procid, ntasks


def _overrides(options: dict[str, Any]) -> dict[str, Any]:
    values = {OPTION_PATHS[name]: value for name, value in options.items() if name in OPTION_PATHS}
    env_rank, env_world = rank_from_environment()
    if values.get("run.rank") is None:
        values["run.rank"] = env_rank
    if values.get("run.world_size") is None:
        values["run.world_size"] = env_world
    if values.get("run.ray_address") is None:
        values["run.ray_address"] = os.environ.get("RAY_ADDRESS") or None
    if not values.get("prompt.questions"):
        values.pop("prompt.questions", None)
    return values


def _quiet_transformers() -> None:
    """transformers' own weight-loading bars would interleave with ours."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    # transformers imports torchao when installed; on machines without its CUDA kernels
    # it logs one warning per extension, and torch warns about its enums: noise in a job log.
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _execute(task: str | None, inputs: list[str] | None, recipe: Path | str | None, options: dict[str, Any]) -> None:
    from .recipebook import read_recipe
    from .spec import build_job_spec

    recipe_values, origin = read_recipe(recipe) if recipe else ({}, "recipe")
    overrides = _overrides(options)
    if task:
        overrides["prompt.task"] = task
    if inputs:
        overrides["data.inputs"] = inputs
    spec = build_job_spec(recipe_values, overrides, recipe_origin=origin)
    if not spec.data.inputs:
        raise UsageError("no input given: pass shard files, folders or patterns (or 'data.inputs' in the recipe)")
    if not spec.output.path:
        raise UsageError("no output folder: pass -o/--output OUT (or 'output.path' in the recipe)")
    if spec.run.world_size > 1:
        err.print(f"[yellow]rank {spec.run.rank} of {spec.run.world_size}: this run does the shards that belong to rank {spec.run.rank}[/]")
    from .api import run  # torch and transformers load only once the options are known to be valid

    _quiet_transformers()
    try:
        result = run(spec, say=lambda text: err.print(f"[yellow]{escape(text)}[/]"))
        _print_summary(result)
    except KeyboardInterrupt:  # a second Ctrl-C/SIGTERM, or one outside the job's own handling
        err.print(f"[red]aborted[/]: parts already in {escape(spec.output.path)}/parts are complete; rerun the same command to resume")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    if result.interrupted:
        err.print(f"[red]interrupted[/]: {result.stats.shards_written} shards saved this run; rerun the same command to resume")
        raise typer.Exit(EXIT_INTERRUPTED)
    if spec.output.strict:
        from .inspection import collect_status

        # all parts count, so a resumed or repeated run still reports errors written earlier
        error_rows = collect_status(result.out)["error_rows"]
        if error_rows:
            err.print(f"[red]strict mode[/]: {error_rows} rows have errors ({result.stats.error_rows} written by this run)")
            raise typer.Exit(EXIT_ERROR_ROWS)


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


# Options every job command (caption, vqa, run) takes after its own, in help order.
JOB_OPTIONS: dict[str, Any] = {
    "max_new_tokens": MaxNew, "temperature": Temperature, "top_p": TopP, "seed": Seed,
    "batch_size": BatchSize, "engine": Engine, "token_budget": TokenBudget, "prefill_batch": PrefillBatch,
    "cuda_graphs": CudaGraphs, "compile": Compile,
    "workers": Workers, "prefetch": Prefetch, "fast_decode": FastDecode, "image_field": ImageField,
    "key_field": KeyField, "max_image_pixels": MaxPixels, "limit": Limit, "shard_size": ShardSize,
    "device": Device, "dtype": Dtype, "attn_implementation": Attn, "quantize": Quantize, "device_map": DeviceMap,
    "revision": Revision, "overwrite": Overwrite, "strict": Strict, "progress": Progress,
    "gpus": Gpus, "rank": Rank, "world_size": WorldSize, "runner": Runner, "ray_address": RayAddress,
}


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
    from .recipebook import bundled_recipes, find_recipe

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
    from .inspection import collect_status

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
    from .inspection import inspect_inputs

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
    from .api import default_cache_dir
    from .bench import BenchConfig, format_preprocess_table, format_table, run_bench, run_preprocess_bench

    _quiet_transformers()
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
