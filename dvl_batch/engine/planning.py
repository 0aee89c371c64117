"""What the slot engine schedules: groups of prompts that share an image prefix, the rows
being answered, and the host clock of admission phases (pure host-side bookkeeping)."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from .types import EnginePrompt, WorkItem


@dataclass
class Group:
    """Prompts of one item that share an identical prefix (at most Q of them)."""

    item: WorkItem
    prefix: list[int]
    prompts: list[EnginePrompt]

    @property
    def suffix_lens(self) -> list[int]:
        return [len(p.input_ids) - len(self.prefix) for p in self.prompts]

    def suffix(self, j: int) -> list[int]:
        return self.prompts[j].input_ids[len(self.prefix) :] if j < len(self.prompts) else []


@dataclass
class Row:
    """One answer being generated: which request it is and the tokens so far."""

    uid: int
    index: int
    prompt_tokens: int
    max_new: int
    tokens: list[int] = field(default_factory=list)


class PhaseClock:
    """Wall time of admission phases. With `sync` it waits for the device at each lap, so
    the times are the phases' own (a diagnosis mode: it stops the host running ahead)."""

    def __init__(self, device: torch.device, sync: bool):
        self.sync = sync and device.type == "cuda"
        if self.sync:
            torch.cuda.synchronize()
        self.last = time.perf_counter()

    def lap(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        now = time.perf_counter()
        elapsed, self.last = now - self.last, now
        return elapsed


def plan_groups(item: WorkItem, rows_per_group: int) -> list[Group]:
    """Split an item's prompts into groups that share one prefix, Q prompts at most.

    With one row per group (captioning) the whole prompt is the prefix: one prefill
    pass yields the first token. With several, the prefix ends at the last image
    token and each question is a suffix prefilled against it.
    """
    if rows_per_group == 1:
        return [Group(item, list(p.input_ids), [p]) for p in item.prompts]
    by_prefix: dict[tuple[int, ...], list[EnginePrompt]] = {}
    for prompt in item.prompts:
        prefix_len = min(prompt.prefix_len, len(prompt.input_ids) - 1)  # keep >= 1 suffix token
        by_prefix.setdefault(tuple(prompt.input_ids[:prefix_len]), []).append(prompt)
    groups = []
    for prefix, prompts in by_prefix.items():
        for start in range(0, len(prompts), rows_per_group):
            groups.append(Group(item, list(prefix), prompts[start : start + rows_per_group]))
    return groups


def split_too_long(groups: deque[Group], room: int) -> tuple[deque[Group], list[tuple[Group, EnginePrompt]]]:
    """(the groups with every prompt longer than `room` tokens taken out, those prompts with
    their group): a group keeps its other prompts, and one left with none is dropped."""
    kept: deque[Group] = deque()
    rejected = []
    for group in groups:
        if any(len(p.input_ids) > room for p in group.prompts):
            rejected.extend((group, p) for p in group.prompts if len(p.input_ids) > room)
            group = Group(group.item, group.prefix, [p for p in group.prompts if len(p.input_ids) <= room])
        if group.prompts:
            kept.append(group)
    return kept, rejected


@dataclass
class Layout:
    """Slot geometry: `groups` image prefixes of `rows_per_group` answer rows each, after the
    `common` head every prompt of the layout starts with (computed once, stored in front of each
    group's prefix); `prefix_cap` counts the positions of a group's own prefix, past that head."""

    groups: int
    rows_per_group: int
    prefix_cap: int
    suffix_cap: int
    common: tuple[int, ...] = ()

    @property
    def rows(self) -> int:
        return self.groups * self.rows_per_group


# A shorter shared head is not worth the prefill's extra query rows and the copies in front of
# each group's keys/values (the DeepSeek-VL system prompt is ~32 tokens of a 616-token caption prompt).
MIN_COMMON_TOKENS = 8


def common_head(prefixes: list[list[int]], image_token_id: int | None, previous: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """The tokens every prefix starts with, to be computed once for all of them: the system prompt
    and the text before the first image (image tokens share an id but not their embeddings, so
    the head ends before one), leaving every prefix at least one token of its own. A layout that
    replaces `previous` keeps at most its head (the head only shrinks, so prompts of another
    template cost one reallocation, not one per switch). () when shorter than MIN_COMMON_TOKENS."""
    if not prefixes:
        return ()
    head = list(previous) if previous is not None else list(prefixes[0])
    for prefix in prefixes:
        limit = min(len(head), len(prefix) - 1)
        same = 0
        while same < limit and head[same] == prefix[same]:
            same += 1
        head = head[:same]
    if image_token_id is not None and image_token_id in head:
        head = head[: head.index(image_token_id)]
    return tuple(head) if len(head) >= MIN_COMMON_TOKENS else ()


def starts_with(prefix: list[int], head: tuple[int, ...]) -> bool:
    """Whether a prefix begins with the layout's common head and keeps a token of its own."""
    return len(prefix) > len(head) and tuple(prefix[: len(head)]) == head
