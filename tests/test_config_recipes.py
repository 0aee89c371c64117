"""Recipes: the bundled files, lookup, validation, `dvl-batch recipes` and `dvl-batch run`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dvl_batch import JobSpec, bundled_recipes, run
from dvl_batch.config.recipes import find_recipe
from dvl_batch.config.spec import option_path, spec_from_recipe
from dvl_batch.errors import EXIT_USAGE, UsageError
from dvl_batch.runtime.progress import NullReporter

from .conftest import EXAMPLES, REPO, job_json, read_rows, run_cli

RECIPES = {
    "short-caption": "images",
    "detailed-caption": "parquet",
    "alt-text": "shards",
    "vqa-annotation": "shards",
    "read-text": "images",
    "compare-images": "pairs",
}


def test_bundled_recipes_are_listed_and_shipped_with_the_package():
    found = {info.name: info for info in bundled_recipes()}
    assert set(found) == set(RECIPES)
    for info in found.values():
        assert info.description and info.task in ("caption", "vqa")
        assert info.path.stem == info.name
    package_copy = REPO / "dvl_batch" / "recipes"
    assert package_copy.is_dir(), "dvl_batch/recipes is what a wheel ships (pyproject package-data)"
    for path in sorted((REPO / "recipes").glob("*.yaml")):
        assert (package_copy / path.name).read_bytes() == path.read_bytes()


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_builds_a_valid_spec(name):
    spec = JobSpec.from_recipe(name, inputs="data/", output="out")
    assert spec.data.inputs == ("data/",) and spec.output.path == "out"
    assert spec.prompt.task == ("vqa" if name == "vqa-annotation" else "caption")
    assert spec == spec_from_recipe(str(REPO / "recipes" / f"{name}.yaml"), inputs=["data/"], output="out")


def test_recipe_settings_and_overrides():
    spec = JobSpec.from_recipe("vqa-annotation", inputs=[Path("x")], model="tiny", max_new_tokens=5, top_p=0.5,
                               **{"batch.batch_size": 3})
    assert spec.model.name == "tiny" and spec.generation.max_new_tokens == 5 and spec.generation.top_p == 0.5
    assert spec.batch.batch_size == 3 and spec.data.inputs == ("x",)
    assert len(spec.prompt.questions) == 4 and spec.prompt.turns[0][0] == "user"
    assert spec.prompt.max_prompt_tokens == 1024
    alt = JobSpec.from_recipe("alt_text")
    assert alt.prompt.system_prompt.startswith("You write alt text")
    compare = JobSpec.from_recipe("compare-images", system_prompt="Be brief.")
    assert compare.prompt.prompt.count("<image>") == 2 and compare.prompt.system_prompt == "Be brief."
    assert JobSpec.from_recipe(None, max_new_tokens=7).generation.max_new_tokens == 7


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: find_recipe("short-captoin"), "unknown recipe 'short-captoin' (did you mean 'short-caption'?)"),
        (lambda: find_recipe("nowhere/recipe.yaml"), "recipe not found: nowhere/recipe.yaml"),
        (lambda: option_path("max_new_token"), "unknown option 'max_new_token' (did you mean 'max_new_tokens'?)"),
        (lambda: JobSpec.from_recipe("short-caption", quantize="int3"), "model.quantize must be one of"),
        (lambda: JobSpec.from_recipe("short-caption", attn_implementation="flash_attention2"), "did you mean 'flash_attention_2'"),
        (lambda: JobSpec.from_recipe("short-caption", max_prompt_tokens=0), "max_prompt_tokens must be >= 1"),
    ],
)
def test_lookup_and_option_errors(call, message):
    with pytest.raises(UsageError) as caught:
        call()
    assert message in str(caught.value)


@pytest.mark.parametrize(
    "text,message",
    [
        ("generation:\n  max_new_token: 5\n", "unknown key 'generation.max_new_token' (did you mean 'max_new_tokens'?)"),
        ("genration:\n  max_new_tokens: 5\n", "recipe mine.yaml: unknown key 'genration' (did you mean 'generation'?)"),
        ("generation:\n  max_new_tokens: lots\n", "generation.max_new_tokens: expected an integer"),
        ("prompt: Describe it.\n", "section 'prompt' must be a mapping"),
        ("- a list\n", "must be a mapping of sections"),
        ("prompt:\n  prompt: [unclosed\n", "is not valid YAML"),
        ("task: captions\n", "prompt.task must be one of caption, vqa"),
        ("task: vqa\n", "vqa needs questions"),
    ],
)
def test_recipe_validation_errors_name_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    with pytest.raises(UsageError) as caught:
        JobSpec.from_recipe(path)
    assert message in str(caught.value)


def test_cli_lists_and_prints_recipes(cache_dir):
    listing = run_cli(["recipes", "--json"], cache_dir)
    assert listing.returncode == 0, listing.stderr
    assert {r["name"] for r in json.loads(listing.stdout)} == set(RECIPES)
    table = run_cli(["recipes"], cache_dir)
    assert table.returncode == 0 and all(name in table.stdout for name in RECIPES)
    shown = run_cli(["recipes", "read-text"], cache_dir)
    assert shown.stdout == (REPO / "recipes" / "read-text.yaml").read_text()
    unknown = run_cli(["run", "captoin", "-i", str(EXAMPLES / "images"), "-o", "unused"], cache_dir)
    assert unknown.returncode == EXIT_USAGE and unknown.stderr.startswith("error: unknown recipe 'captoin'")
    assert "Traceback" not in unknown.stderr


def test_cli_run_recipe_with_overrides(tmp_path, cache_dir):
    out = tmp_path / "out"
    args = ["run", "short-caption", "-i", str(EXAMPLES / "images"), "-o", str(out), "--model", "tiny",
            "--max-new-tokens", "5", "--prompt", "Say what you see.", "--workers", "0", "--no-progress"]
    result = run_cli(args, cache_dir)
    assert result.returncode == 0, result.stderr
    rows = read_rows(out).to_pandas()
    assert len(rows) == 6 and set(rows["question"]) == {"Say what you see."} and rows["error"].isna().all()
    assert job_json(out)["spec"]["generation"]["max_new_tokens"] == 5
    missing_output = run_cli(["run", "short-caption", "-i", str(EXAMPLES / "images")], cache_dir)
    assert missing_output.returncode == EXIT_USAGE and "no output folder" in missing_output.stderr


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_runs_on_the_bundled_examples(tmp_path, cache_dir, name):
    """The Python API the CLI uses, in-process: one run per recipe with the tiny model."""
    spec = JobSpec.from_recipe(
        name, inputs=[str(EXAMPLES / RECIPES[name])], output=str(tmp_path / "out"), model="tiny",
        max_new_tokens=4, workers=0, progress=False,
    )
    result = run(spec, reporter=NullReporter(), cache_dir=cache_dir, offline=True, say=lambda text: None)
    rows = read_rows(result.out).to_pandas()
    questions = len(spec.prompt.questions) if spec.prompt.task == "vqa" else 1
    assert len(rows) == 6 * questions and rows["error"].isna().all(), rows["error"].dropna().tolist()
    assert result.stats.rows == len(rows) and not result.interrupted
    images_per_sample = 2 if name == "compare-images" else 1
    assert (rows["prompt_tokens"] > images_per_sample * 576).all()


def test_readme_recipe_example_is_a_valid_recipe(tmp_path):
    import re

    blocks = re.findall(r"```yaml\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert blocks
    for number, block in enumerate(blocks):
        path = tmp_path / f"readme-{number}.yaml"
        path.write_text(block)
        spec = JobSpec.from_recipe(path)
        assert spec.prompt.turns and spec.prompt.system_prompt
