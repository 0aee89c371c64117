"""Which slot-engine runs a bench makes from its --quantize and --kv-dtype options."""

from __future__ import annotations

import pytest

from dvl_batch.bench.variants import check_variant_options, variant_name, variants
from dvl_batch.errors import UsageError


def test_every_combination_runs_with_the_bf16_reference_first():
    runs = variants(("fp8", "none"), ("fp8", "auto"))
    assert runs[0] == ("none", "auto")
    assert sorted(runs) == sorted([("fp8", "fp8"), ("fp8", "auto"), ("none", "fp8"), ("none", "auto")])


def test_paired_runs_only_the_ith_weights_with_the_ith_kv_type():
    assert variants(("none", "fp8"), ("auto", "fp8"), paired=True) == [("none", "auto"), ("fp8", "fp8")]
    assert [variant_name(*run)[0] for run in variants(("fp8", "none"), ("fp8", "auto"), paired=True)] == [
        "dvl", "dvl_w_fp8_kv_fp8"]


def test_a_run_asked_for_twice_runs_once():
    assert variants(("none", "none"), ("auto", "auto"), paired=True) == [("none", "auto")]


@pytest.mark.parametrize(("quantize", "kv", "paired", "message"), [
    (("none", "fp8"), ("auto",), True, "give as many of each (got 2 and 1)"),
    (("int3",), ("auto",), False, "--quantize must be one of"),
    (("none",), ("fp4",), False, "--kv-dtype must be one of"),
])
def test_bad_variant_options_are_one_usage_error(quantize, kv, paired, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_variant_options(quantize, kv, paired)
