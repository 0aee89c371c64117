"""`--quantize fp8`'s own layers on CPU: the quantisation arithmetic and the module swap.

On CPU `Fp8Linear` computes the dequantised float32 product (what `torch._scaled_mm`
computes on a GPU, tested there in tests/test_gpu.py); the fp8 mode itself is refused on
CPU (tests/test_engine_quantize.py).
"""

from __future__ import annotations

import torch

from dvl_batch.engine.fp8_linear import E4M3_MAX, Fp8Linear, quantize_rows_torch, to_fp8_linears


def test_rows_quantize_to_e4m3_with_their_maximum_at_448():
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [1e-3, 3e4, -7.0]])
    values, scale = quantize_rows_torch(x)
    assert values.dtype == torch.float8_e4m3fn and scale.shape == (3, 1)
    assert values.float().abs().amax(dim=1).tolist() == [E4M3_MAX, 0.0, E4M3_MAX]
    assert torch.isfinite(scale).all() and (scale > 0).all(), "a zero row gets a tiny scale, not a division by zero"
    back = values.float() * scale
    assert torch.allclose(back, x, rtol=2**-3, atol=1e-2 * x.abs().amax())  # e4m3: 3 mantissa bits


def test_fp8_linear_matches_the_bf16_layer_within_e4m3_precision():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96, bias=True)
    layer = Fp8Linear.from_linear(linear, min_rows=16)
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.shape == (1, 96)
    x = torch.randn(4, 5, 256)  # 20 rows: the float8 path
    got, ref = layer(x), linear(x)
    assert got.shape == ref.shape == (4, 5, 96)
    error = ((got - ref).norm() / ref.norm()).item()
    assert 1e-4 < error < 0.06, error


def test_small_products_keep_the_bfloat16_weight():
    """Decode steps (fewer rows than min_rows) compute exactly what the original layer does."""
    linear = torch.nn.Linear(64, 32, bias=False)
    layer = Fp8Linear.from_linear(linear, min_rows=16)
    x = torch.randn(15, 64)
    assert torch.equal(layer(x), linear(x))
    y = torch.randn(16, 64)
    assert not torch.equal(layer(y), linear(y)), "16 rows take the float8 path"


def test_only_chosen_linear_layers_with_widths_of_16_are_swapped():
    model = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.ReLU(), torch.nn.Linear(48, 10),
                                torch.nn.Sequential(torch.nn.Linear(48, 64)))
    replaced = to_fp8_linears(model, lambda name, _module: name != "0")
    assert replaced == 1  # "2" is 10 wide (not a multiple of 16), "0" is not chosen
    assert [type(m).__name__ for m in (model[0], model[2], model[3][0])] == ["Linear", "Linear", "Fp8Linear"]


def test_fp8_jobs_have_a_new_identity_and_other_formats_keep_theirs():
    """fp8 changed from torchao's layers to these: a folder started with the old is not resumed
    with the new; int8wo jobs keep their fingerprint."""
    from dvl_batch.config.spec import JobSpec

    fp8 = JobSpec.from_recipe(None, model="tiny", quantize="fp8").output_identity("m")
    int8 = JobSpec.from_recipe(None, model="tiny", quantize="int8wo").output_identity("m")
    assert fp8["quantize"] == "fp8/e4m3-prefill-bf16-decode" and int8["quantize"] == "int8wo"
