"""Counterfactual name swaps: gold trajectories whose entities are renamed, so only copying fits them.

A small policy trained on gold trajectories can fit a training row without reading its tool
results: it recognises a training entity in the image and writes that entity's memorized name and
facts. Held-out questions have entities it never saw, so what it needs is the other skill, copying
a name from a result into the next query and the answer out of a passage. A swapped copy of a row
renames every KB entity the row mentions, consistently (names and aliases), to another entity of
the same kind: the image no longer matches the names, the facts in the passages no longer match
memory, and the one way to predict the query and the answer is to copy them from the context.

Only names that occur in the training rows are used (as entities to rename and as new names), so no
name from a held-out split enters training. Images, crops and tool-call structure are unchanged.
"""

from __future__ import annotations

import json
import random
import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path


class NameSwap:
    def __init__(self, entities: list[dict], texts: Iterable[str]):
        """`entities`: the KB's entity records (name, aliases, kind); `texts`: every training row's text."""
        forms = {}  # surface form -> (entity index, alias index; -1 = the name)
        for i, e in enumerate(entities):
            for j, form in enumerate([e["name"], *e.get("aliases", [])]):
                forms.setdefault(form, (i, j - 1))
        pattern = _alternation(forms)
        seen = set()
        for text in texts:
            seen.update(forms[m.group(0)][0] for m in pattern.finditer(text))
        self.entities = entities
        self.forms = {f: v for f, v in forms.items() if v[0] in seen}
        self.pattern = _alternation(self.forms)
        self.by_kind: dict[str, list[int]] = defaultdict(list)
        for i in sorted(seen):
            self.by_kind[entities[i]["kind"]].append(i)

    @classmethod
    def from_kb(cls, kb_dir: str | Path, texts: Iterable[str]) -> NameSwap:
        lines = Path(kb_dir, "entities.jsonl").read_text().splitlines()
        return cls([json.loads(line) for line in lines if line.strip()], texts)

    def swap(self, messages: list[dict], rng: random.Random) -> list[dict] | None:
        """The messages with every mentioned entity renamed; None when the row mentions none."""
        renamed = self.rename(messages, rng)
        return renamed[0] if renamed else None

    def rename(self, messages: list[dict], rng: random.Random) -> tuple[list[dict], set[str]] | None:
        """(the renamed messages, the names and aliases written in), or None when the row mentions no entity."""
        mentioned = sorted({self.forms[m.group(0)][0] for text in message_texts(messages) for m in self.pattern.finditer(text)})
        if not mentioned:
            return None
        new_name = {}
        for kind in sorted({self.entities[i]["kind"] for i in mentioned}):  # sorted: set order varies by process
            old = [i for i in mentioned if self.entities[i]["kind"] == kind]
            pool = [i for i in self.by_kind[kind] if i not in old] or self.by_kind[kind]
            for i, j in zip(old, rng.sample(pool, min(len(old), len(pool)))):
                new_name[i] = j

        written: set[str] = set()

        def rename(match: re.Match) -> str:
            entity, alias = self.forms[match.group(0)]
            target = self.entities[new_name.get(entity, entity)]
            aliases = target.get("aliases", [])
            form = aliases[alias] if 0 <= alias < len(aliases) else target["name"]
            written.add(form)
            return form

        return [_map_text(m, lambda text: self.pattern.sub(rename, text)) for m in messages], written


def _alternation(forms: dict) -> re.Pattern:
    """One regex for all surface forms, longest first, matched as whole words."""
    ordered = sorted(forms, key=len, reverse=True)
    return re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, ordered)) + r")(?!\w)")


def message_texts(messages: list[dict]) -> Iterable[str]:
    for m in messages[1:]:  # the system prompt names no entity
        content = m["content"]
        if isinstance(content, str):
            yield content
        else:
            yield from (p["text"] for p in content if p.get("type") == "text")


def _map_text(message: dict, fn) -> dict:
    if message["role"] == "system":
        return message
    out = dict(message)
    content = message["content"]
    if isinstance(content, str):
        out["content"] = fn(content)
    else:
        out["content"] = [{**p, "text": fn(p["text"])} if p.get("type") == "text" else p for p in content]
    if "tool_calls" in message:
        out["tool_calls"] = [{**c, "function": {**c["function"], "arguments": fn(c["function"]["arguments"])}}
                             for c in message["tool_calls"]]
    return out
