"""The run path the CLI and `dvl_batch.run` share: what the environment, the spec and the output decide.

Each test here pins a behaviour the CLI used to have alone (launch defaults, the
output check, `output.strict`) or a rule that used to be written several times
(the processor load, `--gpus`, the decoder count, seeded sampling).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from dvl_batch import JobSpec, run
from dvl_batch.config import launch
from dvl_batch.config.launch import default_decoders, parse_gpus
from dvl_batch.errors import EXIT_ERROR_ROWS, UsageError
from dvl_batch.runtime.progress import NullReporter
from dvl_batch.runtime.runners.ray import ray_engine_devices
from dvl_batch.runtime.session import ErrorRowsError, checked_spec, pick_runner

from .conftest import EXAMPLES, example_images

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_ARRAY_TASK_ID",
                    "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT", "RAY_ADDRESS")


@pytest.fixture
def clean_launch_env(monkeypatch):
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _spec(tmp_path, **options) -> JobSpec:
    base = dict(inputs=[str(EXAMPLES / "shards")], output=str(tmp_path / "out"), model="tiny", max_new_tokens=3,
                workers=0, progress=False)
    return JobSpec.from_recipe(None, **{**base, **options})


def test_api_takes_rank_world_size_and_ray_address_from_the_environment(tmp_path, clean_launch_env):
    clean_launch_env.setenv("SLURM_PROCID", "1")
    clean_launch_env.setenv("SLURM_NTASKS", "3")
    clean_launch_env.setenv("RAY_ADDRESS", "ray://head:10001")
    spec = checked_spec(_spec(tmp_path))
    assert (spec.run.rank, spec.run.world_size, spec.run.ray_address) == (1, 3, "ray://head:10001")
    explicit = checked_spec(_spec(tmp_path, rank=0, world_size=2, ray_address="ray://other:1"))
    assert (explicit.run.rank, explicit.run.world_size, explicit.run.ray_address) == (0, 2, "ray://other:1")


def test_api_checks_the_launch_environment_before_touching_output(tmp_path, clean_launch_env):
    clean_launch_env.setenv("RANK", "5")
    clean_launch_env.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match=r"run.rank must be in \[0, 2\)"):
        run(_spec(tmp_path), reporter=NullReporter(), offline=True, say=lambda text: None)
    assert not (tmp_path / "out").exists()


def test_api_without_output_path_is_a_usage_error_and_writes_nothing(tmp_path, monkeypatch, clean_launch_env):
    monkeypatch.chdir(tmp_path)
    spec = JobSpec.from_recipe(None, inputs=[str(EXAMPLES / "shards")], model="tiny", workers=0, progress=False)
    with pytest.raises(UsageError, match="no output folder"):
        run(spec, reporter=NullReporter(), offline=True, say=lambda text: None)
    assert list(tmp_path.iterdir()) == []


def test_output_strict_through_the_api_raises_exit_code_4_with_the_result(tmp_path, cache_dir, clean_launch_env):
    data = tmp_path / "images"
    data.mkdir()
    (data / "good.jpg").write_bytes(next(iter(example_images().values())))
    (data / "broken.jpg").write_bytes(b"not an image")
    spec = _spec(tmp_path, inputs=[str(data)], strict=True)
    with pytest.raises(ErrorRowsError) as caught:
        run(spec, reporter=NullReporter(), cache_dir=cache_dir, offline=True, say=lambda text: None)
    assert caught.value.exit_code == EXIT_ERROR_ROWS
    assert "1 rows have errors" in str(caught.value)
    assert caught.value.result.stats.rows == 2


def test_the_processor_is_loaded_once_and_with_the_jobs_revision(tmp_path, cache_dir, clean_launch_env, monkeypatch):
    from transformers import AutoProcessor

    loads = []
    real = AutoProcessor.from_pretrained.__func__

    def recording(cls, path, *args, **kwargs):
        loads.append(kwargs.get("revision"))
        return real(cls, path, *args, **kwargs)

    monkeypatch.setattr(AutoProcessor, "from_pretrained", classmethod(recording))
    result = run(_spec(tmp_path, revision="main"), reporter=NullReporter(), cache_dir=cache_dir, offline=True,
                 say=lambda text: None)
    assert result.stats.rows > 0
    assert loads == ["main"]  # the device worker's load, shared with the sample preparer


def test_decoders_load_the_processor_at_the_jobs_revision(tiny_model_dir, monkeypatch):
    from transformers import AutoProcessor

    from dvl_batch.preprocess.preparer import SamplePreparer

    seen = []
    real = AutoProcessor.from_pretrained.__func__
    monkeypatch.setattr(AutoProcessor, "from_pretrained",
                        classmethod(lambda cls, path, **kw: seen.append(kw.get("revision")) or real(cls, path, **kw)))
    SamplePreparer(JobSpec.from_recipe(None, revision="v1.0"), str(tiny_model_dir))
    assert seen == ["v1.0"]


def test_gpus_lists_one_engine_per_entry_for_every_runner(tmp_path):
    assert parse_gpus("2").entries == ("cuda:2",)
    assert ray_engine_devices("2", cluster_gpus=4) == ["cuda:0"]  # one GPU actor, as one engine locally
    assert ray_engine_devices("0,1", cluster_gpus=4) == ["cuda:0", "cuda:0"]
    assert ray_engine_devices("cpu,cpu", cluster_gpus=0) == ["cpu", "cpu"]
    local = pick_runner(_spec(tmp_path, gpus="1"))
    several = pick_runner(_spec(tmp_path, gpus="cpu,cpu"))
    assert (local.__name__, several.__name__) == ("run_local", "run_multi_gpu")


def test_decoder_count_follows_the_cpu_affinity_mask(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert launch.usable_cpus() == 3
    assert default_decoders() == 2  # one core kept for the engine
    assert default_decoders(engines=2) == 1


def test_importing_the_package_changes_no_global_settings():
    code = (
        "import os, PIL.Image\n"
        "import dvl_batch.cli, dvl_batch.preprocess.images, dvl_batch.preprocess.stream\n"
        "assert PIL.Image.MAX_IMAGE_PIXELS is not None, 'Pillow limit changed at import'\n"
        "assert 'TOKENIZERS_PARALLELISM' not in os.environ, 'tokenizer setting changed at import'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TOKENIZERS_PARALLELISM"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_decoding_uses_our_pixel_limit_not_pillows():
    import PIL.Image

    from dvl_batch.preprocess.images import decode_image

    before = PIL.Image.MAX_IMAGE_PIXELS
    decode_image(next(iter(example_images().values())), 10**12)
    assert before == PIL.Image.MAX_IMAGE_PIXELS  # ours only while decoding, Pillow's restored after


def test_generate_engine_samples_from_its_own_generator(tiny_model, tiny_processor):
    from dvl_batch.config.spec import BatchSpec, GenerationSpec
    from dvl_batch.engine.generate import GenerateEngine
    from dvl_batch.engine.types import EnginePrompt, WorkItem
    from dvl_batch.preprocess.images import decode_image, render_views, views_from_image_processor
    from dvl_batch.preprocess.prompts import PromptRenderer

    views = views_from_image_processor(tiny_processor.image_processor)
    prompt = PromptRenderer(tiny_processor).tokenize("Describe this image.", 1)
    image = decode_image(next(iter(example_images().values())), 10**9)
    pixels = {k: torch.from_numpy(v)[None] for k, v in render_views(image, views).items()}
    eos = tiny_processor.tokenizer.eos_token_id

    def sample(seed: int) -> list[list[int]]:
        gen = GenerationSpec(max_new_tokens=8, temperature=1.0, top_p=0.95, seed=seed)
        engine = GenerateEngine(tiny_model, views, gen, BatchSpec(batch_size=4), [eos], eos)
        items = [WorkItem(0, pixels, [EnginePrompt(i, prompt.input_ids, prompt.prefix_len) for i in range(3)])]
        return [c.tokens for c in sorted(engine.run(iter(items)), key=lambda c: c.index)]

    torch.manual_seed(1234)
    state = torch.random.get_rng_state()
    first = sample(7)
    assert torch.equal(torch.random.get_rng_state(), state), "the global RNG was reseeded or consumed"
    assert sample(7) == first


def test_compiled_kernels_are_kept_under_the_cache_folder_unless_the_user_chose_a_place(tmp_path, monkeypatch):
    """A warm start reuses torch.compile's and Triton's artifacts; /tmp (inductor's default) is
    wiped between cluster jobs, so the run points both at its cache folder."""
    from dvl_batch.config.launch import use_compile_cache

    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.setenv(name, "placeholder")  # so the test's changes are undone afterwards
        monkeypatch.delenv(name)
    use_compile_cache(tmp_path / "cache")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache" / "torch-compile")
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "cache" / "triton")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/mine")
    use_compile_cache(tmp_path / "other")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/mine"


def test_an_unexpected_error_shuts_the_decoder_processes_down(tmp_path, cache_dir, clean_launch_env, monkeypatch):
    """Decoders ignore SIGTERM, so one left running after an error (a bug deep in the run) was
    joined forever by the interpreter's exit: the command hung instead of failing."""
    import multiprocessing

    from dvl_batch.runtime.assembly import ShardAssembler

    def broken(self, *args):
        raise RuntimeError("a bug in the assembler")

    monkeypatch.setattr(ShardAssembler, "add_sample", broken)
    with pytest.raises(RuntimeError, match="a bug in the assembler") as raised:
        run(_spec(tmp_path, workers=1), cache_dir=cache_dir, offline=True, say=lambda text: None)
    assert raised.traceback, "the frames (and the generators they hold) are still referenced here"
    assert multiprocessing.active_children() == []


def test_a_busy_decoder_is_killed_when_the_run_fails(tmp_path, cache_dir, clean_launch_env, monkeypatch):
    """A decoder busy on a slow read outlived torch's polite shutdown (it ignores SIGTERM), and
    the interpreter's exit waited on it: the error must end the run at once, decoders gone."""
    import multiprocessing
    import time

    from dvl_batch.preprocess.preparer import SamplePreparer
    from dvl_batch.runtime.assembly import ShardAssembler

    prepare = SamplePreparer.prepare

    def slow(self, item, shard):
        if item.index >= 1:
            time.sleep(60)  # forked with the decoder: its second sample takes a minute
        return prepare(self, item, shard)

    def broken(self, *args):
        raise RuntimeError("a bug in the assembler")

    monkeypatch.setattr(SamplePreparer, "prepare", slow)
    monkeypatch.setattr(ShardAssembler, "add_sample", broken)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="a bug in the assembler"):
        run(_spec(tmp_path, workers=1), cache_dir=cache_dir, offline=True, say=lambda text: None)
    assert multiprocessing.active_children() == [] and time.monotonic() - started < 30
