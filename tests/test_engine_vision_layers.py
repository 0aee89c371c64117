"""The slot engine's SigLIP layers with fc1's bias and GELU in the matmul: same features (float32),
transformers' forward untouched for every other caller, same answers as generate."""

from __future__ import annotations

import copy

import torch
from transformers import SiglipVisionConfig
from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer, SiglipMLP

from dvl_batch.config.spec import BatchSpec, GenerationSpec
from dvl_batch.engine.continuous import SlotEngine
from dvl_batch.engine.model import VisionLanguageModel
from dvl_batch.engine.vision_layers import (
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
    for enabled in (True, False):
        engine = SlotEngine(VisionLanguageModel(model), views, GenerationSpec(max_new_tokens=MAX_NEW),
                            BatchSpec(batch_size=4, vision_epilogue=enabled), [eos], eos)
        got = {(c.uid, c.index): c.tokens for c in engine.run(iter(items))}
        assert isinstance(model.model.vision_model.encoder.layers[0], EpilogueSiglipLayer) == enabled
        assert got == refs, f"vision_epilogue={enabled}"


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
