"""The example scripts run as users run them: `python examples/NAME.py`, tiny model, offline."""

from __future__ import annotations

import subprocess
import sys

from .conftest import EXAMPLES, cli_env, read_rows


def _script(args: list[str], cache_dir) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=cli_env(cache_dir), capture_output=True, text=True, timeout=300)


def test_run_recipe_script(tmp_path, cache_dir):
    """Two recipes here; every recipe runs on the examples in test_config_recipes.py."""
    out = tmp_path / "out"
    args = [str(EXAMPLES / "run_recipe.py"), "vqa-annotation", "compare-images", "--model", "tiny", "--out", str(out),
            "--max-new-tokens", "3"]
    result = _script(args, cache_dir)
    assert result.returncode == 0, result.stderr
    for name, rows in [("vqa-annotation", 24), ("compare-images", 6)]:
        assert f"== {name}: {rows} rows" in result.stdout
        table = read_rows(out / name).to_pandas()
        assert len(table) == rows and table["error"].isna().all()


def test_python_api_script(tmp_path, cache_dir):
    out = tmp_path / "out"
    result = _script([str(EXAMPLES / "python_api.py"), "--model", "tiny", "--out", str(out), "--max-new-tokens", "3"], cache_dir)
    assert result.returncode == 0, result.stderr
    assert "captions: 6 rows, 0 errors" in result.stdout
    assert "rerun: 0 shards written, 1/1 done" in result.stdout
    pairs = read_rows(out / "pairs-vqa").to_pandas()
    assert len(pairs) == 12 and pairs["error"].isna().all() and (pairs["prompt_tokens"] <= 1400).all()
