"""Prompts: which questions each sample gets, and how a question becomes token ids.

The default rendering is the checkpoint's own chat template, so prompts match what
the model was trained on. A system-prompt override renders the same DeepSeek-VL chat
layout by hand (the shipped template has no slot for it). Image placeholders are
expanded to the processor's `num_image_tokens` exactly as the processor does, and
the index just past the last placeholder is recorded: everything before it is the
shared prefix that several questions about one image can reuse.
"""

from __future__ import annotations

import copy
import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config.spec import PromptSpec
from ..config.validate import suggest
from ..errors import UsageError

# The DeepSeek-VL checkpoints' own system prompt, used when the job sets none and the
# processor has no chat template (the offline tiny model writes it into its template).
DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual "
    "content that the user provides, and assist the user with a variety of tasks using natural language."
)

IMAGE_MARKER = "<image>"  # what users write in a question to place an image inline


@dataclass(frozen=True)
class TokenizedPrompt:
    """One request's prompt: question text, token ids and the shared-prefix length."""

    question: str
    input_ids: list[int]
    prefix_len: int  # tokens up to and including the last image placeholder
    truncated_tokens: int = 0  # how many tokens max_prompt_tokens cut from the question text


class QuestionBook:
    """Questions per sample, from the spec's list, a keyed file, or a sample field."""

    def __init__(self, spec: PromptSpec):
        self.spec = spec
        self.by_key: dict[str, list[str]] = {}
        if spec.questions_file:
            self.by_key = load_questions_file(Path(spec.questions_file))

    def questions_for(self, key: str, fields: dict[str, Any]) -> list[str]:
        """The questions to ask about one sample; empty means "nothing to ask"."""
        if self.spec.task == "caption":
            return [self.spec.prompt]
        found: list[str] = list(self.spec.questions)
        if self.spec.questions_file:
            found.extend(self.by_key.get(key, []))
        if self.spec.question_field:
            found.extend(field_questions(fields, self.spec.question_field))
        return found


def field_questions(fields: dict[str, Any], name: str) -> list[str]:
    """A question field may hold text, a list of texts, or JSON reached by 'json.question'."""
    head, _, rest = name.partition(".")
    value: Any = fields.get(name)
    if value is None and rest and isinstance(fields.get(head), dict):
        value = fields[head]
        for part in rest.split("."):
            value = value.get(part) if isinstance(value, dict) else None
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    text = str(value).strip()
    return [text] if text else []


def load_questions_file(path: Path) -> dict[str, list[str]]:
    """JSONL ({"key":..., "question": ... or "questions": [...]}) or CSV (key,question); a file
    that cannot be read as such is one usage error, whatever is wrong with it."""
    if not path.is_file():
        raise UsageError(f"questions file not found: {path}")
    try:
        return _read_questions(path)
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from exc
    except OSError as exc:
        raise UsageError(f"cannot read the questions file {path} ({exc.strerror or exc})") from None
    except (csv.Error, RecursionError, OverflowError) as exc:
        raise UsageError(f"{path}: cannot be read as questions ({type(exc).__name__}: {str(exc)[:120]})") from exc


def _read_questions(path: Path) -> dict[str, list[str]]:
    if path.suffix.lower() == ".csv":
        return _read_csv_questions(path)
    table: dict[str, list[str]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise UsageError(f"{path}:{number}: not valid JSON ({exc})") from exc
        if not isinstance(record, dict) or "key" not in record:
            raise UsageError(f"{path}:{number}: each line needs a 'key' and a 'question' or 'questions'")
        if "question" not in record and "questions" not in record:
            others = [name for name in record if name != "key"]
            hint = next((suggest(name, ("question", "questions")) for name in others if suggest(name, ("question", "questions"))), "")
            raise UsageError(
                f"{path}:{number}: no 'question' or 'questions' field (found: {', '.join(record) or 'nothing'}){hint}"
            )
        table.setdefault(_record_key(record, path, number), []).extend(_record_questions(record, path, number))
    return table


def _read_csv_questions(path: Path) -> dict[str, list[str]]:
    """key,question rows; strict quoting, so an unclosed quote is an error naming its line,
    not the rest of the file read as one question. Rows with no value at all are skipped."""
    table: dict[str, list[str]] = {}
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, strict=True)
        if not reader.fieldnames or "key" not in reader.fieldnames or "question" not in reader.fieldnames:
            found = list(reader.fieldnames or [])
            hint = next((suggest(name, ("key", "question")) for name in found
                         if name not in ("key", "question") and suggest(name, ("key", "question"))), "")
            raise UsageError(
                f"{path}: CSV needs a header with 'key' and 'question' columns (found: {', '.join(found) or 'none'}){hint}"
            )
        rows = iter(reader)
        while True:
            start = reader.line_num + 1  # a quoted question may span lines: name the first
            try:
                row = next(rows)
            except StopIteration:
                return table
            except csv.Error as exc:
                hint = "; check the quotes on this line" if "quot" in str(exc) or "end of data" in str(exc) else ""
                raise UsageError(f"{path}:{start}: not valid CSV ({exc}){hint}") from None
            key, question = (row["key"] or "").strip(), (row["question"] or "").strip()
            if not key and not question and not any((v or "").strip() for v in row.values() if isinstance(v, str)):
                continue  # an empty row (",,"), as spreadsheets export them
            if not key or not question:
                missing = "question" if key else "key"
                raise UsageError(f"{path}:{start}: empty {missing}; every row needs a key and a question")
            table.setdefault(row["key"], []).append(question)


def _record_key(record: dict[str, Any], path: Path, number: int) -> str:
    key = record["key"]
    if isinstance(key, bool) or not isinstance(key, (str, int, float)) or not str(key).strip():
        raise UsageError(f"{path}:{number}: 'key' must be a non-empty text or number (got {json.dumps(key)[:40]})")
    return str(key)


def _record_questions(record: dict[str, Any], path: Path, number: int) -> list[str]:
    """A line's questions; an empty one is refused (dropping it would renumber the others)."""
    questions = record.get("questions", [record.get("question")])
    if isinstance(questions, str):
        questions = [questions]
    if not isinstance(questions, list) or not all(isinstance(q, (str, int, float)) and not isinstance(q, bool)
                                                  for q in questions if q is not None):
        raise UsageError(f"{path}:{number}: 'question' must be text and 'questions' a list of texts")
    texts = [str(q).strip() if q is not None else "" for q in questions]
    if not texts or not all(texts):
        raise UsageError(f"{path}:{number}: an empty question (null, blank or an empty list); remove it or write one")
    return texts


class PromptRenderer:
    """Question text plus image count to token ids, the way the checkpoint expects.

    A prompt is the recipe's earlier `turns` (few-shot examples, an instruction the
    assistant acknowledged) followed by the question as the final user turn. Images go
    where `<image>` markers stand, in the turns or the question; without markers they
    all precede the question text.
    """

    def __init__(
        self,
        processor,
        system_prompt: str | None = None,
        turns: tuple[tuple[str, str], ...] = (),
        max_prompt_tokens: int | None = None,
    ):
        self.tokenizer = processor.tokenizer
        self.chat_template = getattr(processor, "chat_template", None)
        self.processor = processor
        self.image_token = processor.image_token
        self.image_token_id = int(processor.image_token_id)
        self.num_image_tokens = int(getattr(processor, "num_image_tokens", 576))
        self.system_prompt = system_prompt
        self.turns = tuple(turns)
        self.max_prompt_tokens = max_prompt_tokens
        self._cache: dict[tuple[str, int], TokenizedPrompt] = {}
        self._special_strings: list[str] | None = None

    @classmethod
    def from_spec(cls, processor, spec: PromptSpec) -> PromptRenderer:
        return cls(processor, spec.system_prompt, spec.turns, spec.max_prompt_tokens)

    def conversation(self, question: str, n_images: int) -> list[dict[str, Any]]:
        """Chat messages: earlier turns, then the question; images at markers or before the question."""
        markers = sum(text.count(IMAGE_MARKER) for _, text in self.turns) + question.count(IMAGE_MARKER)
        if markers and markers != n_images:
            raise ValueError(f"prompt has {markers} {IMAGE_MARKER} markers but the sample has {n_images} images")
        messages = [{"role": role, "content": _content_parts(text)} for role, text in self.turns]
        final = _content_parts(question)
        if not markers:
            final = [{"type": "image"} for _ in range(n_images)] + final
        messages.append({"role": "user", "content": final})
        return messages

    def render(self, question: str, n_images: int) -> str:
        messages = self.conversation(question, n_images)
        if self.system_prompt is None and self.chat_template:
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.render_by_hand(messages)

    def render_by_hand(self, messages: list[dict[str, Any]]) -> str:
        """The DeepSeek-VL layout: system text, "User: ...\n\n", "Assistant: ...<eos>", then "Assistant:"."""
        system = DEFAULT_SYSTEM_PROMPT if self.system_prompt is None else self.system_prompt
        text = f"{system}\n\n" if system else ""
        for message in messages:
            body = "".join(self.image_token if p["type"] == "image" else p["text"] for p in message["content"])
            if message["role"] == "user":
                text += f"User: {body}\n\n"
            else:
                text += f"Assistant: {body}{self.tokenizer.eos_token}"
        return text + "Assistant:"

    def _ids(self, question: str, n_images: int) -> list[int]:
        user_texts = (question, self.system_prompt or "", *(text for _, text in self.turns))
        if any(special in text for special in self._specials() for text in user_texts):
            ids = self._ids_plain_user_text(question, n_images)
        else:
            text = self.render(question, n_images)
            expanded = text.replace(self.image_token, self.image_token * self.num_image_tokens)
            ids = self.tokenizer(expanded, add_special_tokens=True)["input_ids"]
        if ids.count(self.image_token_id) != n_images * self.num_image_tokens:
            raise ValueError("image placeholders in the prompt do not match the number of images")
        return ids

    def _specials(self) -> list[str]:
        """The tokenizer's special-token strings, longest first (looked up once)."""
        if self._special_strings is None:
            self._special_strings = sorted({t for t in self.tokenizer.all_special_tokens if t}, key=len, reverse=True)
        return self._special_strings

    def _ids_plain_user_text(self, question: str, n_images: int) -> list[int]:
        """Token ids where special-token strings typed in user text (the EOS string in a
        question) are plain text, while the template's own (image tokens, EOS after an
        assistant turn, BOS) stay special.

        The user's occurrences are hidden behind private-use marks while the template is
        rendered; the result is cut at the template's special tokens (where the tokenizer
        cuts anyway) and each piece, marks restored, is tokenized with special tokens split.
        """
        specials = self._specials()
        marks = {special: f"\ue000{index}\ue001" for index, special in enumerate(specials)}

        def hide(text: str) -> str:
            for special, mark in marks.items():
                text = text.replace(special, mark)
            return text

        def restore(text: str) -> str:
            for special, mark in marks.items():
                text = text.replace(mark, special)
            return text

        hidden = copy.copy(self)
        hidden.turns = tuple((role, hide(text)) for role, text in self.turns)
        hidden.system_prompt = None if self.system_prompt is None else hide(self.system_prompt)
        text = hidden.render(hide(question), n_images)
        expanded = text.replace(self.image_token, self.image_token * self.num_image_tokens)
        with_wrap = self.tokenizer("x", add_special_tokens=True)["input_ids"]
        bare = self.tokenizer("x", add_special_tokens=False)["input_ids"]
        ids: list[int] = list(with_wrap[: len(with_wrap) - len(bare)])  # BOS, as add_special_tokens adds it
        for piece in re.split("(" + "|".join(re.escape(s) for s in specials) + ")", expanded):
            if piece in marks:
                ids.append(int(self.tokenizer.convert_tokens_to_ids(piece)))
            elif piece:
                ids.extend(self.tokenizer(restore(piece), add_special_tokens=False, split_special_tokens=True)["input_ids"])
        return ids

    def tokenize(self, question: str, n_images: int) -> TokenizedPrompt:
        """Token ids of one prompt; over `max_prompt_tokens`, the question text is cut (never images).

        Memoised: a caption job asks the same question of every image, and tokenizing a
        prompt with 576 placeholders costs about as much as resizing the image.
        """
        key = (question, n_images)
        cached = self._cache.get(key)
        if cached is None:
            cached = self._tokenize(question, n_images)
            if len(self._cache) < 4096:
                self._cache[key] = cached
        return cached

    def _tokenize(self, question: str, n_images: int) -> TokenizedPrompt:
        ids = self._ids(question, n_images)
        cut = 0
        if self.max_prompt_tokens is not None and len(ids) > self.max_prompt_tokens:
            ids, cut = self._truncated(question, n_images, len(ids))
        last = len(ids) - 1 - ids[::-1].index(self.image_token_id) if n_images else 0
        return TokenizedPrompt(question=question, input_ids=ids, prefix_len=last + 1 if n_images else 0, truncated_tokens=cut)

    def _truncated(self, question: str, n_images: int, full_length: int) -> tuple[list[int], int]:
        """Drop question tokens from the end until the prompt fits; images and turns stay whole.

        Re-tokenizing the shortened text can merge differently, so the cut grows until
        the rendered prompt really fits (it always does once the question text is gone).
        """
        limit = int(self.max_prompt_tokens or 0)
        pieces = question.split(IMAGE_MARKER)
        bare = self._ids(IMAGE_MARKER.join("" for _ in pieces), n_images)
        if len(bare) > limit:
            images = f"{n_images} image(s) of {self.num_image_tokens} tokens" if n_images else "no images"
            raise ValueError(
                f"prompt needs {len(bare)} tokens even without its question text ({images}), "
                f"more than max_prompt_tokens {limit}"
            )
        piece_ids = [self.tokenizer(piece, add_special_tokens=False)["input_ids"] for piece in pieces]
        drop = full_length - limit
        for _ in range(16):
            kept, remaining = [], drop
            for text, piece in zip(reversed(pieces), reversed(piece_ids), strict=True):
                take = min(len(piece), remaining)
                remaining -= take
                kept.append(self.tokenizer.decode(piece[: len(piece) - take], clean_up_tokenization_spaces=False) if take else text)
            ids = self._ids(IMAGE_MARKER.join(reversed(kept)), n_images)
            if len(ids) <= limit:
                return ids, full_length - len(ids)
            drop += len(ids) - limit
        return bare, full_length - len(bare)


def _content_parts(text: str) -> list[dict[str, Any]]:
    """Text and image parts of one turn, stripped at the ends as the checkpoint's template does."""
    parts: list[dict[str, Any]] = []
    pieces = text.split(IMAGE_MARKER)
    for index, piece in enumerate(pieces):
        if index:
            parts.append({"type": "image"})
        if index == 0:
            piece = piece.lstrip()
        if index == len(pieces) - 1:
            piece = piece.rstrip()
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts
