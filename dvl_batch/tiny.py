"""A tiny random-weight DeepSeek-VL built locally, for tests and the offline demo.

The real checkpoints cannot be downloaded everywhere (CI, air-gapped clusters), yet
every code path of dvl-batch must run against the *real* architecture: the real
processor class, the real chat template layout and the real 576 image placeholders
per image. So this module trains a small byte-level BPE tokenizer, wraps it the way
the checkpoint's tokenizer is wrapped, and instantiates `DeepseekVLForConditionalGeneration`
(or the 7B-style hybrid) with a few narrow layers. The text it writes is gibberish.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import UsageError
from .preprocess.prompts import DEFAULT_SYSTEM_PROMPT

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
IMAGE_TOKEN = "<image_placeholder>"
NUM_IMAGE_TOKENS = 576

# The chat layout of the DeepSeek-VL checkpoints: a system line, then "User: ..." turns that
# end with a blank line and "Assistant: ..." turns that end with EOS; images are
# <image_placeholder> tokens inside the user text.
CHAT_TEMPLATE = (
    "{%- set system = '" + DEFAULT_SYSTEM_PROMPT + "' -%}"
    "{%- for message in messages if message['role'] == 'system' -%}"
    "{%- set system = message['content'] if message['content'] is string "
    "else message['content'][0]['text'] -%}{%- endfor -%}"
    "{{ system }}{{ '\\n\\n' }}"
    "{%- for message in messages if message['role'] != 'system' -%}"
    "{%- if message['role'] == 'user' -%}User: {% else -%}Assistant: {% endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}" + IMAGE_TOKEN + "{%- else -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'user' -%}{{ '\\n\\n' }}{%- else -%}" + EOS_TOKEN + "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}Assistant:{%- endif -%}"
)

_CORPUS = """
A photo of a cat sitting on a wooden table next to a cup of coffee.
An astronaut in a white space suit stands in front of an American flag.
A rocket lifts off from the launch pad with a bright plume of fire and smoke.
A black and white photograph of a man holding a camera on a tripod in a park.
The image shows a colourful logo with transparent background and bold letters.
Describe this image. What is in the picture? How many people are there?
What colour is the sky? Is there any text in the image? Read the text.
The quick brown fox jumps over the lazy dog. Numbers: 0 1 2 3 4 5 6 7 8 9.
User: Assistant: You are a helpful language and vision assistant.
"""

TINY_VERSION = "2"  # bump when the builder changes, so stale caches are rebuilt
EOS_BOOST = 2.5


def tiny_model_id(hybrid: bool = False) -> str:
    """Stable name of the tiny model variant, used as its cache folder name."""
    digest = hashlib.sha1((CHAT_TEMPLATE + _CORPUS + TINY_VERSION).encode()).hexdigest()[:10]
    return f"tiny-deepseek-vl{'-hybrid' if hybrid else ''}-{digest}"


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=[BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS.strip().splitlines() * 4, trainer=trainer)
    bos_id = backend.token_to_id(BOS_TOKEN)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
        model_max_length=16384,
    )


def _image_processors(hybrid: bool):
    """The checkpoint's preprocessing settings (mean/std 0.5, not the class's CLIP defaults)."""
    if hybrid:
        from transformers.models.deepseek_vl_hybrid.image_processing_pil_deepseek_vl_hybrid import (
            DeepseekVLHybridImageProcessorPil,
        )

        return DeepseekVLHybridImageProcessorPil(
            size={"height": 384, "width": 384},
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
            resample=2,  # bilinear for the low-res view, as the 7B checkpoint
            high_res_size={"height": 1024, "width": 1024},
        )
    from transformers.models.deepseek_vl.image_processing_pil_deepseek_vl import DeepseekVLImageProcessorPil

    return DeepseekVLImageProcessorPil(
        size={"height": 384, "width": 384}, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]
    )


def _config(vocab_size: int, image_token_id: int, hybrid: bool, bos_id: int, eos_id: int):
    text = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=vocab_size,
        max_position_embeddings=4096,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        initializer_range=0.5,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=384,
        patch_size=16,
        initializer_range=0.5,
    )
    if hybrid:
        from transformers import DeepseekVLHybridConfig

        high = dict(
            hidden_size=32,
            output_channels=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=1024,
            patch_size=16,
            global_attn_indexes=[1],
            window_size=7,
            mlp_dim=64,
        )
        return DeepseekVLHybridConfig(
            text_config=text,
            vision_config=vision,
            high_res_vision_config=high,
            image_token_id=image_token_id,
            tie_word_embeddings=False,
        )
    from transformers import DeepseekVLConfig

    return DeepseekVLConfig(
        text_config=text, vision_config=vision, image_token_id=image_token_id, tie_word_embeddings=False
    )


def build_tiny_model(out_dir: Path, hybrid: bool = False, seed: int = 0) -> Path:
    """Write a complete tiny checkpoint (config, weights, processor) to `out_dir`."""
    import torch
    from transformers import AutoModelForImageTextToText

    tokenizer = _train_tokenizer()
    image_processor = _image_processors(hybrid)
    if hybrid:
        from transformers import DeepseekVLHybridProcessor as processor_cls
    else:
        from transformers import DeepseekVLProcessor as processor_cls
    processor = processor_cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        num_image_tokens=NUM_IMAGE_TOKENS,
    )
    config = _config(
        vocab_size=len(tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        hybrid=hybrid,
        bos_id=tokenizer.bos_token_id,
        eos_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    with torch.no_grad():
        # Random weights almost never emit EOS; a stronger EOS row makes answers end at
        # varied lengths, which is what batching and resume code must be tested against.
        model.lm_head.weight[tokenizer.eos_token_id] *= EOS_BOOST
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    (out_dir / "dvl_batch_tiny.json").write_text(json.dumps({"tiny": True, "hybrid": hybrid, "seed": seed}))
    return out_dir


def ensure_tiny_model(cache_dir: Path, hybrid: bool = False) -> Path:
    """Return the cached tiny checkpoint, building it once (atomically) if absent.

    Several processes (test workers, GPU workers) may ask at once, so the model is
    built in a temporary sibling folder and renamed into place.
    """
    target = Path(cache_dir) / tiny_model_id(hybrid)
    if (target / "dvl_batch_tiny.json").exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    except OSError as exc:
        raise UsageError(f"cannot build the offline model under {target.parent} ({exc.strerror or exc}); set "
                         "DVL_BATCH_CACHE to a writable folder") from None
    try:
        build_tiny_model(tmp, hybrid=hybrid)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "dvl_batch_tiny.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
