"""Token-budget, length-grouped micro-batches and their assignment to steps and ranks.

A micro-batch holds as many samples as fit `tokens_per_batch` once padded to its longest, so
memory per micro-batch is bounded by tokens, not by a sample count. Samples are shuffled, cut into
pools of a few hundred, and sorted by length inside each pool before packing, so neighbours have
similar lengths and padding stays small while the order stays random from epoch to epoch. The plan
is a pure function of (lengths, seed, epoch): every rank computes the same one, and a resumed run
finds its place in it by step number.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class BatchPlan:
    steps: list[list[list[int]]]  # step -> micro-batches of that step (all ranks) -> sample indices
    padded_tokens: int
    real_tokens: int
    dropped_batches: int  # the epoch's tail that did not fill a whole step

    @property
    def padding_waste(self) -> float:
        """Share of computed positions that are padding."""
        return 1 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0


def pack(lengths: list[int], tokens_per_batch: int, seed: int, epoch: int, pool_batches: int = 32) -> list[list[int]]:
    """Micro-batches of sample indices, each with len(batch) * longest <= tokens_per_batch."""
    order = list(range(len(lengths)))
    rng = random.Random(f"{seed}:{epoch}")
    rng.shuffle(order)
    typical = max(1, tokens_per_batch // max(1, sum(lengths) // max(1, len(lengths))))
    pool_size = max(1, pool_batches * typical)
    batches: list[list[int]] = []
    for start in range(0, len(order), pool_size):
        pool = sorted(order[start:start + pool_size], key=lambda i: lengths[i])
        batch: list[int] = []
        for i in pool:
            longest = max(lengths[i], max((lengths[j] for j in batch), default=0))
            if batch and longest * (len(batch) + 1) > tokens_per_batch:
                batches.append(batch)
                batch = []
            batch.append(i)
        if batch:
            batches.append(batch)
    rng.shuffle(batches)  # sorted pools would otherwise feed short-then-long within each pool
    return batches


def plan_epoch(lengths: list[int], tokens_per_batch: int, micro_batches_per_step: int, seed: int, epoch: int
               ) -> BatchPlan:
    """The epoch's optimizer steps, each `micro_batches_per_step` (= grad_accum x world_size) micro-batches."""
    batches = pack(lengths, tokens_per_batch, seed, epoch)
    n_steps = len(batches) // micro_batches_per_step
    used = batches[:n_steps * micro_batches_per_step]
    steps = [used[s * micro_batches_per_step:(s + 1) * micro_batches_per_step] for s in range(n_steps)]
    padded = sum(len(b) * max(lengths[i] for i in b) for b in used)
    real = sum(lengths[i] for b in used for i in b)
    return BatchPlan(steps, padded, real, len(batches) - len(used))


def rank_share(step: list[list[int]], rank: int, world_size: int) -> list[list[int]]:
    """The micro-batches of a step that `rank` runs (interleaved so ranks get similar token counts)."""
    return step[rank::world_size]
