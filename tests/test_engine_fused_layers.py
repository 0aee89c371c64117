"""The slot engine's fused projections: no extra memory, generate untouched, same answers."""

from __future__ import annotations

import copy

import torch

from dvl_batch.config.spec import BatchSpec, GenerationSpec
from dvl_batch.engine.continuous import SlotEngine
from dvl_batch.engine.fp8_linear import Fp8Linear
from dvl_batch.engine.fused_layers import FusedProjectionsLayer, fuse_projections
from dvl_batch.engine.model import VisionLanguageModel

from .test_engine_parity import MAX_NEW, _items, generate_references


def _fresh(tiny_model):
    """A private copy: fusing changes the layers' classes, which other tests' model must not see."""
    model = copy.deepcopy(tiny_model)
    fuse_projections(model.model.language_model, enabled=False)
    return model


def test_fused_weights_are_the_originals_and_add_no_memory(tiny_model):
    model = _fresh(tiny_model)
    lm = model.model.language_model
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    keys = set(model.state_dict())
    assert fuse_projections(lm) == len(lm.layers)
    layer = lm.layers[0]
    assert isinstance(layer, FusedProjectionsLayer)
    attn, mlp = layer.self_attn, layer.mlp
    qkv = layer.dvl_qkv.weight
    assert qkv.shape[0] == attn.q_proj.out_features + attn.k_proj.out_features + attn.v_proj.out_features
    for module in (attn.q_proj, attn.k_proj, attn.v_proj):  # views of the fused weight, not copies
        assert module.weight.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()
    assert mlp.up_proj.weight.untyped_storage().data_ptr() == layer.dvl_gate_up.weight.untyped_storage().data_ptr()
    after = dict(model.named_parameters())
    assert set(after) == set(before) and all(torch.equal(after[n], before[n]) for n in before)
    assert set(model.state_dict()) == keys, "the fused products must not be saved with the model"
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in before.values())
    assert fuse_projections(lm) == len(lm.layers)  # idempotent


def test_fused_engine_matches_generate_and_the_unfused_engine(tiny_model, tiny_processor):
    model = _fresh(tiny_model)
    eos = tiny_processor.tokenizer.eos_token_id
    items, views = _items(tiny_processor, lambda uid: 1 + uid % 3)
    refs = generate_references(model, views, items, eos)

    def run(fuse: bool):
        engine = SlotEngine(VisionLanguageModel(model), views, GenerationSpec(max_new_tokens=MAX_NEW),
                            BatchSpec(batch_size=4, fuse_projections=fuse), [eos], eos)
        got = {(c.uid, c.index): c.tokens for c in engine.run(iter(items))}
        fused = isinstance(model.model.language_model.layers[0], FusedProjectionsLayer)
        return got, fused

    fused_tokens, was_fused = run(True)
    assert was_fused
    plain_tokens, was_fused = run(False)
    assert not was_fused
    assert fused_tokens == plain_tokens == refs
    # generate after the fused engine ran: transformers' forward on the re-pointed weights
    assert generate_references(model, views, items, eos) == refs


def test_fused_layer_forward_equals_transformers_forward(tiny_model):
    """Prefix mode collects the layer's keys/values: the fused products give the same ones."""
    from dvl_batch.engine.attention import AttentionStep, route_attention

    model = _fresh(tiny_model)
    lm = model.model.language_model
    route_attention(lm)
    embeds = torch.randn(2, 7, lm.config.hidden_size)
    positions = torch.arange(7)[None].expand(2, -1)

    def forward():
        step = AttentionStep(None, "prefix", collect=[])
        hidden = lm(inputs_embeds=embeds, position_ids=positions, use_cache=False, dvl_step=step).last_hidden_state
        return hidden, step.collect

    with torch.no_grad():
        plain, plain_kv = forward()
        fuse_projections(lm)
        fused, fused_kv = forward()
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    for (k1, v1), (k2, v2) in zip(fused_kv, plain_kv, strict=True):
        torch.testing.assert_close(k1, k2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v1, v2, rtol=1e-5, atol=1e-5)


def test_a_replaced_projection_is_fused_again_from_the_new_modules(tiny_model):
    """A copy of a fused model whose projections became float8 is fused from the float8 ones
    (not left on the bf16 products it inherited); one projection in another format keeps
    transformers' forward."""
    model = _fresh(tiny_model)
    lm = model.model.language_model
    fuse_projections(lm)
    quantized = copy.deepcopy(model)
    layers = quantized.model.language_model.layers
    for layer in layers:
        for parent, name in ((layer.self_attn, "q_proj"), (layer.self_attn, "k_proj"), (layer.self_attn, "v_proj"),
                             (layer.mlp, "gate_proj"), (layer.mlp, "up_proj")):
            setattr(parent, name, Fp8Linear.from_linear(getattr(parent, name), min_rows=1))
    layers[0].self_attn.q_proj = layers[0].self_attn.q_proj.linear  # mixed formats: not fusable
    assert fuse_projections(quantized.model.language_model) == len(layers) - 1
    assert not isinstance(layers[0], FusedProjectionsLayer) and "dvl_qkv" not in layers[0].__dict__
    assert type(layers[0]) is type(lm.layers[0]).__mro__[2]
    fused = layers[1]
    assert isinstance(fused.dvl_qkv, Fp8Linear) and isinstance(fused.dvl_gate_up, Fp8Linear)
    rows = torch.randn(5, lm.config.hidden_size)
    attn = fused.self_attn
    separate = torch.cat([attn.q_proj(rows), attn.k_proj(rows), attn.v_proj(rows)], dim=-1)
    torch.testing.assert_close(fused.dvl_qkv(rows), separate)  # per-row scales: concatenation is exact
    assert attn.k_proj.weight.untyped_storage().data_ptr() == fused.dvl_qkv.weight.untyped_storage().data_ptr()


def test_fusing_under_inference_mode_leaves_ordinary_weights(tiny_model):
    """The engine builds its store under inference_mode; the re-pointed weights must still serve
    outside it (a later load_state_dict or a forward with gradients)."""
    model = _fresh(tiny_model)
    lm = model.model.language_model
    state = copy.deepcopy(model.state_dict())
    with torch.inference_mode():
        fuse_projections(lm)
    attn = lm.layers[0].self_attn
    assert not attn.q_proj.weight.is_inference() and not lm.layers[0].dvl_qkv.weight.is_inference()
    model.load_state_dict(state)


def test_a_moved_or_copied_layer_is_fused_again(tiny_model):
    """Fused products that are no longer made of the layer's weights (a deep copy clones them,
    `.to()` makes new ones) are rebuilt, so the fused forward never uses stale or mismatched tensors."""
    model = _fresh(tiny_model)
    lm = model.model.language_model
    fuse_projections(lm)
    copied = copy.deepcopy(model)
    layer = copied.model.language_model.layers[0]
    stale = layer.dvl_qkv
    assert fuse_projections(copied.model.language_model) == len(lm.layers)
    assert layer.dvl_qkv is not stale
    assert layer.self_attn.q_proj.weight.untyped_storage().data_ptr() == layer.dvl_qkv.weight.untyped_storage().data_ptr()
    copied.to(torch.float64)
    fuse_projections(copied.model.language_model)
    assert layer.dvl_qkv.weight.dtype == torch.float64 == layer.dvl_gate_up.weight.dtype


def test_a_replaced_bias_is_fused_again():
    """Llama with attention_bias: a bias replaced after fusing (a loaded adapter, a new
    Parameter) makes the fused product stale too, not only a replaced weight."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaModel

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=50, attention_bias=True)
    lm = LlamaModel(config).eval()
    assert fuse_projections(lm) == 1
    layer = lm.layers[0]
    attn = layer.self_attn
    attn.k_proj.bias = torch.nn.Parameter(torch.randn(attn.k_proj.out_features))
    assert fuse_projections(lm) == 1
    assert attn.k_proj.bias.untyped_storage().data_ptr() == layer.dvl_qkv.bias.untyped_storage().data_ptr()
    rows = torch.randn(3, 32)
    with torch.no_grad():
        separate = torch.cat([attn.q_proj(rows), attn.k_proj(rows), attn.v_proj(rows)], dim=-1)
        torch.testing.assert_close(layer.dvl_qkv(rows), separate)


def test_layers_with_more_than_llamas_arithmetic_keep_their_forward():
    """Only transformers' Llama forwards are replaced: a layer of the same shape with its own
    forward (Qwen3's q/k norms, say) would be computed wrongly by the fused one."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaModel

    class OtherLayer(LlamaDecoderLayer):
        def forward(self, hidden_states, *args, **kwargs):
            return super().forward(hidden_states, *args, **kwargs) * 2

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=50)
    model = LlamaModel(config)
    model.layers[1] = OtherLayer(config, 1)
    assert fuse_projections(model) == 1
    assert isinstance(model.layers[0], FusedProjectionsLayer) and not isinstance(model.layers[1], FusedProjectionsLayer)
