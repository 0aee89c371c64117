"""The slot engine's SigLIP layers with fc1's bias and GELU in the matmul and one Q/K/V product:
same features (float32), transformers' forward untouched for every other caller, same answers
as generate."""

from __future__ import annotations

import copy

import torch
from transformers import SiglipVisionConfig
from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer, SiglipMLP

from dvl_batch.config.spec import BatchSpec, GenerationSpec
from dvl_batch.engine.continuous import SlotEngine
from dvl_batch.engine.model import VisionLanguageModel
from dvl_batch.engine.vision_layers import (
    QKV,
    VISION_KWARG,
    EpilogueSiglipLayer,
    engine_image_features,
    gelu_mlp,
    use_vision_epilogue,
)

from .test_engine_parity import MAX_NEW, _items, generate_references


def _fresh(model):
    """A private copy: the epilogue changes the layers' classes, which other tests' model must not see."""
    model = copy.deepcopy(model)
    use_vision_epilogue(model, enabled=False)
    return model


def _pixels(batch: int = 2) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(batch, 3, 384, 384, generator=torch.Generator().manual_seed(0))}


def test_gelu_mlp_is_siglips_mlp():
    config = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2)
    mlp = SiglipMLP(config).eval()
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(gelu_mlp(mlp, x), mlp(x), rtol=1e-5, atol=1e-6)


def test_only_layers_with_the_tanh_gelu_and_a_bias_take_the_epilogue():
    eligible = torch.nn.ModuleList([SiglipEncoderLayer(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2))])
    exact_gelu = torch.nn.ModuleList([SiglipEncoderLayer(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                                                            hidden_act="gelu"))])
    no_bias = copy.deepcopy(eligible)
    no_bias[0].mlp.fc1.bias = None
    assert use_vision_epilogue(eligible) == 1 and isinstance(eligible[0], EpilogueSiglipLayer)
    assert use_vision_epilogue(exact_gelu) == 0 and type(exact_gelu[0]) is SiglipEncoderLayer
    assert use_vision_epilogue(no_bias) == 0
    assert use_vision_epilogue(eligible) == 1  # idempotent
    assert use_vision_epilogue(eligible, enabled=False) == 0 and type(eligible[0]) is SiglipEncoderLayer


def test_engine_features_match_and_other_callers_keep_transformers_forward(tiny_model):
    model = _fresh(tiny_model)
    vlm = VisionLanguageModel(model)
    pixels = _pixels()
    with torch.inference_mode():
        before = vlm.image_features(pixels)
        layers = len(model.model.vision_model.encoder.layers)
        features = engine_image_features(vlm, True)
        assert use_vision_epilogue(model) == layers
        assert features.keywords == {VISION_KWARG: True}
        torch.testing.assert_close(features(pixels), before, rtol=1e-4, atol=1e-5)
        assert torch.equal(vlm.image_features(pixels), before), "calls without the engine's flag run transformers' forward"
        assert engine_image_features(vlm, False) == vlm.image_features
        assert not any(isinstance(m, EpilogueSiglipLayer) for m in model.modules()), "taken away again"
    assert set(model.state_dict()) == set(tiny_model.state_dict())


def test_engine_with_the_epilogue_matches_generate(tiny_model, tiny_processor):
    model = _fresh(tiny_model)
    eos = tiny_processor.tokenizer.eos_token_id
    items, views = _items(tiny_processor, lambda uid: 1 + uid % 3)
    refs = generate_references(model, views, items, eos)
    for enabled, fused in ((True, True), (True, False), (False, True)):
        engine = SlotEngine(VisionLanguageModel(model), views, GenerationSpec(max_new_tokens=MAX_NEW),
                            BatchSpec(batch_size=4, vision_epilogue=enabled, fuse_projections=fused), [eos], eos)
        got = {(c.uid, c.index): c.tokens for c in engine.run(iter(items))}
        layer = model.model.vision_model.encoder.layers[0]
        assert isinstance(layer, EpilogueSiglipLayer) == enabled
        assert (QKV in layer.__dict__) == (enabled and fused), "one Q/K/V product only with both choices on"
        assert got == refs, f"vision_epilogue={enabled} fuse_projections={fused}"


def _layer() -> torch.nn.ModuleList:
    config = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2)
    return torch.nn.ModuleList([SiglipEncoderLayer(config).eval()])


def test_one_qkv_product_gives_the_layers_output_without_more_memory():
    layers = _layer()
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        want = layers[0](x, None)
        parameters = sum(t.untyped_storage().nbytes() for t in {p.untyped_storage().data_ptr(): p for p in layers.parameters()}.values())
        assert use_vision_epilogue(layers) == 1
        layer = layers[0]
        fused = layer.__dict__[QKV]
        attn = layer.self_attn
        assert fused.weight.shape == (96, 32) and fused.bias.shape == (96,)
        for i, proj in enumerate((attn.q_proj, attn.k_proj, attn.v_proj)):
            assert proj.weight.untyped_storage().data_ptr() == fused.weight.untyped_storage().data_ptr()
            assert torch.equal(proj.weight, fused.weight[32 * i:32 * (i + 1)])
        after = sum(t.untyped_storage().nbytes() for t in {p.untyped_storage().data_ptr(): p for p in layers.parameters()}.values())
        assert after == parameters, "q/k/v are views of the one product: no copy kept"
        assert QKV not in dict(layers.named_modules(remove_duplicate=False)) and len(layers.state_dict()) == 16
        torch.testing.assert_close(layer(x, None, **{VISION_KWARG: True}), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer(x, None), want, rtol=0, atol=0)


def test_the_qkv_product_follows_replaced_weights_and_is_skipped_without_biases():
    layers = _layer()
    use_vision_epilogue(layers)
    layer = layers[0]
    first = layer.__dict__[QKV]
    assert use_vision_epilogue(layers) == 1 and layer.__dict__[QKV] is first, "idempotent"
    layers.to(torch.float64)  # new tensors: the old product would multiply stale float32 weights
    assert use_vision_epilogue(layers) == 1 and layer.__dict__[QKV].weight.dtype == torch.float64
    x = torch.randn(1, 5, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x, None, **{VISION_KWARG: True}), layer(x, None))
    assert use_vision_epilogue(layers, fuse_qkv=False) == 1 and QKV not in layer.__dict__
    layer.self_attn.k_proj.bias = None
    assert use_vision_epilogue(layers) == 1 and QKV not in layer.__dict__, "the epilogue stays, the fusion does not"
    assert use_vision_epilogue(layers, enabled=False) == 0 and QKV not in layer.__dict__


def test_a_recipe_turns_the_epilogue_off():
    """`batch.vision_epilogue: false` (the README's way back to transformers' arithmetic) is a recipe key."""
    from dvl_batch.config.spec import build_job_spec

    assert build_job_spec().batch.vision_epilogue is True
    assert build_job_spec({"batch.vision_epilogue": False}).batch.vision_epilogue is False


def test_a_model_the_engine_changed_pickles_and_loads_in_a_fresh_process(tiny_model, tmp_path):
    """torch.save(model) after an engine ran: the layers' run-time classes are found again when
    the model is loaded elsewhere (a process that never built them), with the engine's forwards."""
    import subprocess
    import sys
    from pathlib import Path

    from dvl_batch.engine.fused_layers import FusedProjectionsLayer, fuse_projections

    model = _fresh(tiny_model)
    vlm = VisionLanguageModel(model)
    engine_image_features(vlm, True)
    fuse_projections(model.model.language_model)
    assert isinstance(model.model.language_model.layers[0], FusedProjectionsLayer)
    path = tmp_path / "model.pt"
    torch.save(model, path)
    pixels = _pixels()
    with torch.inference_mode():
        want = vlm.image_features(pixels, **{VISION_KWARG: True})
    torch.save(pixels, tmp_path / "pixels.pt")
    check = (
        "import sys, torch\n"
        "from dvl_batch.engine.model import VisionLanguageModel\n"
        "model = torch.load(sys.argv[1], weights_only=False)\n"
        "print(type(model.model.vision_model.encoder.layers[0]).__name__, type(model.model.language_model.layers[0]).__name__)\n"
        "with torch.inference_mode():\n"
        "    got = VisionLanguageModel(model).image_features(torch.load(sys.argv[2]), dvl_vision=True)\n"
        "torch.save(got, sys.argv[3])\n"
    )
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", check, str(path), str(tmp_path / "pixels.pt"), str(tmp_path / "got.pt")],
                            capture_output=True, text=True, timeout=300, cwd=repo)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["EpilogueSiglipEncoderLayer", "FusedLlamaDecoderLayer"]
    assert torch.equal(torch.load(tmp_path / "got.pt"), want)
