"""One spec builder: the CLI's options, `JobSpec.from_recipe` and Ray Data's ImageAnswerer agree."""

from __future__ import annotations

import dataclasses
from inspect import signature

import pytest

from dvl_batch import JobSpec, cli
from dvl_batch.cli_options import JOB_OPTIONS
from dvl_batch.config.sections import SECTION_TYPES
from dvl_batch.config.spec import option_path
from dvl_batch.errors import UsageError


def _field_exists(path: str) -> bool:
    section, key = path.split(".", 1)
    return key in {f.name for f in dataclasses.fields(SECTION_TYPES[section])}


def test_every_cli_option_names_a_spec_field_through_the_shared_mapping():
    own = {name for command in (cli.caption, cli.vqa, cli.run_recipe) for name in signature(command).parameters}
    names = (set(JOB_OPTIONS) | own) - {"inputs", "recipe"}
    unmapped = {name: option_path(name) for name in names if not _field_exists(option_path(name))}
    assert not unmapped
    assert option_path("question") == "prompt.questions" and option_path("strict") == "output.strict"


def test_unknown_options_are_refused_with_a_hint():
    with pytest.raises(UsageError, match="did you mean 'max_new_tokens'"):
        JobSpec.from_recipe(None, max_new_token=3)


def test_image_answerer_takes_bundled_recipe_names_like_from_recipe(cache_dir):
    from dvl_batch.ray_data import ImageAnswerer

    expected = JobSpec.from_recipe("short-caption", model="tiny", device="cpu", max_new_tokens=4)
    answerer = ImageAnswerer("tiny", recipe="short-caption", max_new_tokens=4, device="cpu",
                             cache_dir=str(cache_dir), decode_threads=1)
    assert answerer.spec == expected
    assert answerer.spec.prompt.prompt == "Describe this image in one sentence."


def test_decode_compilation_follows_its_option_and_never_outlives_no_compile():
    assert JobSpec.from_recipe(None).batch.compiles_decode
    assert not JobSpec.from_recipe(None, compile_decode=False).batch.compiles_decode
    assert not JobSpec.from_recipe(None, compile=False).batch.compiles_decode  # --no-compile: nothing compiled


def test_compile_auto_is_decided_by_the_input_left_to_read():
    """`batch.compile: auto` (the default) compiles a job with 2 GB or more of input left, or of
    unknown size (remote shards), and not a small one (a cron run over a few new shards, whose
    start compiling would double); an explicit choice is never changed."""
    from dvl_batch.config.launch import AUTO_COMPILE_MIN_BYTES, resolve_compile

    spec = JobSpec.from_recipe(None)
    assert spec.batch.compile == "auto" and spec.batch.compiles  # unresolved (Ray Data's engines): compiles
    small, notice = resolve_compile(spec, 50 * 2**20)
    assert small.batch.compile is False and not small.batch.compiles_decode
    assert "small job (50 MB of input left)" in notice and "--compile" in notice
    for size in (AUTO_COMPILE_MIN_BYTES, None):
        large, notice = resolve_compile(spec, size)
        assert large.batch.compile is True and large.batch.compiles_decode and notice is None
    shared, notice = resolve_compile(spec, 3 * 2**30, engines=2)  # each engine would read 1.5 GB
    assert shared.batch.compile is False and "for 2 engines" in notice
    assert resolve_compile(spec, 5 * 2**30, engines=2)[0].batch.compile is True
    for chosen in (True, False):
        explicit = JobSpec.from_recipe(None, compile=chosen)
        assert resolve_compile(explicit, 1)[0].batch.compile is chosen
        assert resolve_compile(explicit, None)[0].batch.compile is chosen


def test_batch_compile_takes_auto_true_or_false_only():
    assert JobSpec.from_recipe(None, **{"batch.compile": "auto"}).batch.compile == "auto"
    assert JobSpec.from_recipe(None, **{"batch.compile": "false"}).batch.compile is False
    with pytest.raises(UsageError, match="batch.compile must be auto, true or false"):
        JobSpec.from_recipe(None, **{"batch.compile": "sometimes"})
