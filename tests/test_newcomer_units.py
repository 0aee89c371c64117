"""Issue 12 at unit level: messages and renders a new user reads (no model loaded)."""

from __future__ import annotations

import dataclasses
import json

from dvl_batch.config.spec import JobSpec
from dvl_batch.sink.output import describe_differences


def test_mismatch_names_each_changed_setting_with_old_and_new():
    spec = JobSpec.from_recipe(None, questions=["What is it?"], task="vqa")
    stored = json.loads(json.dumps(spec.output_identity("m")))  # job.json turns tuples into lists
    assert describe_differences(stored, spec.output_identity("m")) == "different settings"
    changed = dataclasses.replace(spec, generation=dataclasses.replace(spec.generation, max_new_tokens=8))
    message = describe_differences(stored, changed.output_identity("m"))
    assert message == "changed: generation.max_new_tokens 128 -> 8"
    other_model = describe_differences(stored, changed.output_identity("other"))
    assert '"m" -> "other"' in other_model and "generation.max_new_tokens 128 -> 8" in other_model
    assert "prompt" not in other_model
