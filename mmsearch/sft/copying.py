"""Copy rows: strings of random token ids, each followed by itself, so that the policy learns to copy.

Every search question ends in copying: a name from an image-search result into the next query, the
answer out of a passage. Held-out questions are about entities the policy never saw, and their
names may hold tokens that no training row contains (20 of 186 held-out search answers at the
1,000-token tokenizer, 157 at 4,133): such embeddings stay where initialisation put them, so even a
policy that has learned to copy cannot copy them (README, "Copy circuits", p1). Copy rows draw ids uniformly from the whole
vocabulary (special and protocol tokens excepted), so every id is trained as something that can be
read and written back, and the loss on the second reading rewards copying by content only (the
strings have random lengths, so no fixed offset works). The ids are random symbols, not text: no
row says anything about any entity.

A row is a string followed by itself, no chat template around it, trained (mask 1) on the second
reading after its first id (the one place that cannot be predicted): wrapped in the chat template
as a user turn and an assistant turn, the same strings formed no copying within 800 steps where
bare ones did (README, "Copy circuits").
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from mmsearch.trajectory import Trajectory


@dataclass
class CopyRowsConfig:
    rows: int = 0  # how many copy rows join the training samples (0: none)
    min_len: int = 8  # ids per string, drawn uniformly in [min_len, max_len]
    max_len: int = 32

    def check(self) -> None:
        if self.rows < 0 or not 2 <= self.min_len <= self.max_len:
            raise ValueError(f"copy_rows needs rows >= 0 and 2 <= min_len <= max_len, got {self}")


def copyable_ids(tokenizer) -> list[int]:
    """Every id a string may hold: the whole vocabulary but special and added (protocol) tokens."""
    excluded = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    return [i for i in range(len(tokenizer)) if i not in excluded]


def copy_rows(tokenizer, cfg: CopyRowsConfig, seed: int) -> list[Trajectory]:
    """`cfg.rows` copy samples, a pure function of the tokenizer, the config and the seed."""
    cfg.check()
    ids = copyable_ids(tokenizer)
    rng = random.Random(f"copy:{seed}")
    samples = []
    for n in range(cfg.rows):
        string = [rng.choice(ids) for _ in range(rng.randint(cfg.min_len, cfg.max_len))]
        mask = [0] * (len(string) + 1) + [1] * (len(string) - 1)
        samples.append(Trajectory(
            example_id=f"copy-{n:06d}", sample=0, messages=[], images=[],
            token_ids=string + string, loss_mask=mask, logprobs=[0.0] * len(mask),
        ))
    return samples
