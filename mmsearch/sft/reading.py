"""Reading rows: the turn after a text tool result, cut out of a renamed gold trajectory.

Copying a name is two skills. Once a name's first token is written, an induction circuit carries
the rest (the copy stage teaches it, `mmsearch.sft.copying`). The first token is a lookup: which
name in the result the next step needs, the answer after "is headquartered in", result [1]'s title.
A full trajectory trains that lookup a few times per ~1,000 tokens, and a small policy learns to
write the most frequent first token instead (README, "Question words and reading rows").

A reading row is a fragment of a gold trajectory with every entity renamed at random to another
training entity (`mmsearch.sft.augment.NameSwap`): the turn that made a tool call, the tool's text
result, and the next turn, trained from the first renamed name it writes to its end. The renaming
makes the name impossible to recall from memory, so only reading the result fits it; the
fragment is ~200 tokens, so the lookup is trained several times as often per token. Fragments are
cut from the token ids of the rebuilt sample, so they are exactly the tokens a rollout holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

from mmsearch.trajectory import Trajectory


@dataclass
class ReadingRowsConfig:
    rows: int = 0  # how many reading rows join the training samples (0: none)

    def check(self) -> None:
        if self.rows < 0:
            raise ValueError(f"reading_rows.rows must be >= 0, got {self.rows}")


def trained_runs(loss_mask: list[int]) -> list[tuple[int, int]]:
    """[start, end) of every run of trained tokens: the assistant turns."""
    runs, start = [], None
    for i, m in enumerate([*loss_mask, 0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs


def reading_fragments(sample: Trajectory, tokenizer, names: set[str], turn_start_id: int, vision_start_id: int
                      ) -> list[Trajectory]:
    """Every turn of `sample` that writes one of `names` right after a text-only tool result, as a fragment.

    A fragment runs from the header of the turn that called the tool to the end of the turn that
    reads the result; only the reading turn from the token that starts the first name is trained.
    """
    ids, runs, out = sample.token_ids, trained_runs(sample.loss_mask), []
    for (call_start, call_end), (start, end) in pairwise(runs):
        if vision_start_id in ids[call_end:start]:
            continue  # the result holds an image: not a reading step
        first = _first_name_token(tokenizer, ids[start:end], names)
        if first is None:
            continue
        begin = max(i for i in range(call_start) if ids[i] == turn_start_id)
        mask = [0] * (start + first - begin) + [1] * (end - start - first)
        out.append(Trajectory(example_id=f"{sample.example_id}:read{len(out)}", sample=0, messages=[], images=[],
                              token_ids=ids[begin:end], loss_mask=mask, logprobs=[0.0] * len(mask)))
    return out


def _first_name_token(tokenizer, ids: list[int], names: set[str]) -> int | None:
    """Index of the token that holds the first character of the earliest name in the decoded `ids`."""
    text = tokenizer.decode(ids)
    found = [i for i in (text.find(n) for n in names) if i >= 0]
    if not found:
        return None
    char = min(found)
    for j in range(len(ids)):
        if len(tokenizer.decode(ids[:j + 1])) > char:
            return j
    return None
