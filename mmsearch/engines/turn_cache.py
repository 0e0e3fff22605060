"""The `hf` engine's KV cache across turns: which trajectory owns which cached row, and what it holds.

After a turn, each row of the batch's KV cache holds its trajectory's tokens so far, except the
last generated one (it was sampled, never fed). The next turn's request for that trajectory starts
with exactly those tokens, so only the rest — that last token, the tool response with any new
images, the next assistant header — has to be encoded. Rows live in batches whose columns are not
aligned across rows (left padding, rows that stopped early, deltas of different lengths); a 0/1
column mask says which columns are a row's own tokens, and positions are tracked per row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from mmsearch.engines.base import GenerationRequest


@dataclass
class CachedBatch:
    cache: DynamicCache
    mask: torch.Tensor  # (rows, columns): 1 where the column holds the row's own token


@dataclass
class CachedRow:
    trajectory: Any  # the object the request carried; identity, not equality, picks the row
    token_ids: list[int]  # the tokens the row's columns hold, in order
    n_images: int  # images among them (their pixels were encoded)
    next_position: int  # rotary position of the next token (past an image, text jumps by its largest side)
    batch: CachedBatch
    index: int  # the row in `batch`

    def continues(self, request: GenerationRequest) -> bool:
        n = len(self.token_ids)
        return request.trajectory is self.trajectory and len(request.token_ids) > n and request.token_ids[:n] == self.token_ids

    def delta(self, request: GenerationRequest) -> GenerationRequest:
        """The part of `request` this row does not hold yet: its new tokens and the pixels of its new images."""
        ids = request.token_ids[len(self.token_ids):]
        grid = request.image_grid_thw
        if grid is None or len(grid) == self.n_images:
            return GenerationRequest(ids)
        seen = int(grid[:self.n_images].prod(-1).sum())
        return GenerationRequest(ids, pixel_values=request.pixel_values[seen:], image_grid_thw=grid[self.n_images:])


class TurnCache:
    """The rows kept from the engine's last call, by trajectory."""

    def __init__(self):
        self.rows: dict[int, CachedRow] = {}

    def take(self, request: GenerationRequest) -> CachedRow | None:
        """The row `request` continues, removed from the cache (so its batch is freed once no row needs it)."""
        row = self.rows.pop(id(request.trajectory), None)
        return row if row is not None and row.continues(request) else None

    def keep(self, rows: list[CachedRow]) -> None:
        """Keep exactly these rows: rows of trajectories that left the batch are dropped."""
        self.rows = {id(row.trajectory): row for row in rows}

    def reset(self) -> None:
        self.rows = {}


def gather_rows(sources: list[tuple[CachedBatch, int]]) -> tuple[DynamicCache, torch.Tensor]:
    """A new cache and column mask holding the given (batch, row) rows in order.

    Rows may come from several batches (the engine splits calls into chunks of `max_batch`, and a
    chunk regroups as trajectories finish); narrower batches are left-padded with masked columns.
    Only a row's order of columns matters: positions are explicit and the mask hides the rest.
    """
    batches = list({id(batch): batch for batch, _ in sources}.values())
    width = max(batch.mask.shape[1] for batch in batches)
    order, masks, layers = [], [], []
    for batch in batches:
        picked = [i for i, (source, _) in enumerate(sources) if source is batch]
        index = torch.tensor([sources[i][1] for i in picked], device=batch.mask.device)
        pad = width - batch.mask.shape[1]
        order += picked
        masks.append(F.pad(batch.mask[index], (pad, 0)))
        layers.append([(F.pad(layer.keys[index], (0, 0, pad, 0)), F.pad(layer.values[index], (0, 0, pad, 0)))
                       for layer in batch.cache.layers])
    restore = torch.tensor(order, device=masks[0].device).argsort()
    data = [(torch.cat([kv[i][0] for kv in layers])[restore], torch.cat([kv[i][1] for kv in layers])[restore])
            for i in range(len(layers[0]))]
    return DynamicCache(ddp_cache_data=data), torch.cat(masks)[restore]
