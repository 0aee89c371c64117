"""The example scripts run as users run them: `python examples/NAME.py`, tiny model, offline."""

from __future__ import annotations

import sys

import pytest

from .cli_processes import Overlapped
from .conftest import EXAMPLES, cli_env, read_rows


@pytest.fixture(scope="module")
def scripts(tmp_path_factory, cache_dir, tiny_model_dir):
    """Both scripts, started together on first use, each writing under its own folder."""
    outs = {name: tmp_path_factory.mktemp(name) / "out" for name in ("run_recipe", "python_api")}
    commands = {
        "run_recipe": [str(EXAMPLES / "run_recipe.py"), "vqa-annotation", "compare-images", "--model", "tiny", "--out",
                       str(outs["run_recipe"]), "--max-new-tokens", "3"],
        "python_api": [str(EXAMPLES / "python_api.py"), "--model", "tiny", "--out", str(outs["python_api"]),
                       "--max-new-tokens", "3"],
    }
    runs = Overlapped({name: ([sys.executable, *args], cli_env(cache_dir), 300) for name, args in commands.items()})
    yield runs, outs
    runs.close()


def test_run_recipe_script(scripts):
    """Two recipes here; every recipe runs on the examples in test_config_recipes.py."""
    runs, outs = scripts
    out = outs["run_recipe"]
    result = runs.result("run_recipe")
    assert result.returncode == 0, result.stderr
    for name, rows in [("vqa-annotation", 24), ("compare-images", 6)]:
        assert f"== {name}: {rows} rows" in result.stdout
        table = read_rows(out / name).to_pandas()
        assert len(table) == rows and table["error"].isna().all()


def test_python_api_script(scripts):
    runs, outs = scripts
    out = outs["python_api"]
    result = runs.result("python_api")
    assert result.returncode == 0, result.stderr
    assert "captions: 6 rows, 0 errors" in result.stdout
    assert "rerun: 0 shards written, 1/1 done" in result.stdout
    pairs = read_rows(out / "pairs-vqa").to_pandas()
    assert len(pairs) == 12 and pairs["error"].isna().all() and (pairs["prompt_tokens"] <= 1400).all()
