"""Chat prompts: system prompt override and conversation turns, in the spec and the renderer."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from dvl_batch.config.spec import JobSpec, build_job_spec, spec_from_json
from dvl_batch.errors import UsageError
from dvl_batch.preprocess.prompts import DEFAULT_SYSTEM_PROMPT, PromptRenderer

from .conftest import EXAMPLES, read_rows, run_cli

FEW_SHOT = (
    ("user", "Answer with one word. What colour is snow?"),
    ("assistant", "White."),
    ("user", "And grass?"),
    ("assistant", "Green."),
)

CONVERSATIONS = [
    ((), "Describe this image.", 1),
    (FEW_SHOT, "What colour is the sky here?", 1),
    (FEW_SHOT, "  Compare <image> and <image>.  ", 2),
    ((("user", "Here is a photo: <image>"), ("assistant", "I see it.")), "What is in it?", 1),
    ((("user", "First <image> then <image>"), ("assistant", "OK.")), "Which is brighter, <image>?", 3),
    ((), "<image><image> Same place?", 2),
    ((), "No images at all?", 0),
]


@pytest.mark.parametrize("turns,question,n_images", CONVERSATIONS)
def test_chat_template_and_hand_rendering_agree(tiny_processor, turns, question, n_images):
    renderer = PromptRenderer(tiny_processor, None, turns)
    messages = renderer.conversation(question, n_images)
    by_template = renderer.render(question, n_images)
    assert by_template == tiny_processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert by_template == renderer.render_by_hand(messages)
    assert by_template.count("<image_placeholder>") == n_images
    assert by_template.startswith(DEFAULT_SYSTEM_PROMPT + "\n\nUser: ") and by_template.endswith("\n\nAssistant:")


def test_turns_come_before_the_question_in_deepseek_layout(tiny_processor):
    eos = tiny_processor.tokenizer.eos_token
    text = PromptRenderer(tiny_processor, None, FEW_SHOT[:2]).render("And this image?", 1)
    assert text == (
        f"{DEFAULT_SYSTEM_PROMPT}\n\nUser: Answer with one word. What colour is snow?\n\n"
        f"Assistant: White.{eos}User: <image_placeholder>And this image?\n\nAssistant:"
    )


def test_system_prompt_override_and_empty_system_prompt(tiny_processor):
    eos = tiny_processor.tokenizer.eos_token
    custom = PromptRenderer(tiny_processor, "You write alt text.", FEW_SHOT[:2]).render("Alt text?", 1)
    assert custom == (
        f"You write alt text.\n\nUser: Answer with one word. What colour is snow?\n\nAssistant: White.{eos}"
        "User: <image_placeholder>Alt text?\n\nAssistant:"
    )
    bare = PromptRenderer(tiny_processor, "", ()).render("Alt text?", 1)
    assert bare == "User: <image_placeholder>Alt text?\n\nAssistant:"


def test_marker_count_must_match_images(tiny_processor):
    renderer = PromptRenderer(tiny_processor, None, (("user", "Look: <image>"), ("assistant", "OK.")))
    with pytest.raises(ValueError, match="1 <image> markers but the sample has 2 images"):
        renderer.tokenize("What now?", 2)


def test_turns_from_recipe_forms_round_trip_through_job_json():
    as_roles = [{"role": "user", "content": "Hi"}, {"role": "Assistant", "content": "Hello."}]
    as_exchanges = [{"user": "Hi", "assistant": "Hello."}]
    a = build_job_spec({"prompt.turns": as_roles})
    b = build_job_spec({"prompt.turns": as_exchanges})
    assert a.prompt.turns == b.prompt.turns == (("user", "Hi"), ("assistant", "Hello."))
    assert hash(a) == hash(b), "the spec stays frozen and hashable"
    again = spec_from_json(json.loads(json.dumps(a.to_dict())))
    assert again == a
    assert a.fingerprint("m") != JobSpec().fingerprint("m"), "turns change rows, so they are part of the identity"


@pytest.mark.parametrize(
    "turns,message",
    [
        ([{"role": "system", "content": "x"}, {"role": "assistant", "content": "y"}], "system text goes in prompt.system_prompt"),
        ([{"role": "usr", "content": "x"}], "did you mean 'user'"),
        ([{"role": "assistant", "content": "x"}], "turn 1 must be a user turn"),
        ([{"user": "a"}, {"user": "b"}], "turn 2 must be a assistant turn"),
        ([{"user": "a", "assistant": "b"}, {"user": "c"}], "must end with an assistant turn"),
        ([{"user": "a", "assistant": " "}], "turn 2 has no text"),
        (["just text"], "turn 1 must be {role: user|assistant, content: TEXT}"),
        ({"user": "not a list"}, "expected a list of turns"),
    ],
)
def test_bad_turns_are_usage_errors(turns, message):
    with pytest.raises(UsageError, match=message.replace("{", r"\{").replace("|", r"\|")):
        build_job_spec({"prompt.turns": turns})


def test_cli_recipe_with_turns_and_system_prompt_override(tmp_path, cache_dir, tiny_model_dir):
    recipe = tmp_path / "chat.yaml"
    recipe.write_text(
        "name: chat\ntask: vqa\nprompt:\n  questions:\n    - What is it?\n  system_prompt: You are terse.\n"
        "  turns:\n    - user: Answer in one word.\n      assistant: OK.\n"
    )
    out = tmp_path / "out"
    base = ["--model", "tiny", "--max-new-tokens", "4", "--workers", "0", "--no-progress"]
    result = run_cli(["run", str(recipe), "-i", str(EXAMPLES / "parquet"), "-o", str(out), *base], cache_dir)
    assert result.returncode == 0, result.stderr
    rows = read_rows(out).to_pandas()
    assert len(rows) == 6 and rows["error"].isna().all()
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    turns = (("user", "Answer in one word."), ("assistant", "OK."))
    expected = PromptRenderer(processor, "You are terse.", turns).tokenize("What is it?", 1)
    without_turns = PromptRenderer(processor, "You are terse.", ()).tokenize("What is it?", 1)
    assert set(rows["prompt_tokens"]) == {len(expected.input_ids)} and len(expected.input_ids) > len(without_turns.input_ids)
    job = json.loads((out / "job.json").read_text())
    assert job["spec"]["prompt"]["turns"] == [["user", "Answer in one word."], ["assistant", "OK."]]
    assert job["spec"]["prompt"]["system_prompt"] == "You are terse."
    part_job = json.loads(pq.read_schema(next((out / "parts").glob("*.parquet"))).metadata[b"dvl_batch"])["job"]
    assert part_job["turns"] == [["user", "Answer in one word."], ["assistant", "OK."]]
