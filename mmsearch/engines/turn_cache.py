"""The `hf` engine's KV cache across turns: which trajectory owns which cached row, and what it holds.

After a turn, each row of the batch's KV cache holds its trajectory's tokens so far, except the
last generated one (it was sampled, never fed). The next turn's request for that trajectory starts
with exactly those tokens, so only the rest — that last token, the tool response with any new
images, the next assistant header — has to be encoded. Rows live in batches whose columns are not
aligned across rows (left padding, rows that stopped early, deltas of different lengths); a 0/1
column mask says which columns are a row's own tokens, and positions are tracked per row.
A call's cache is a KVBuffer, allocated once with room for what the call will decode and written
in place; gathering rows for the next call packs each row's own columns together.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from mmsearch.engines.base import GenerationRequest


class BufferLayer(DynamicLayer):
    """A cache layer whose keys and values live in buffers allocated once with room for `capacity`
    columns: each update writes its columns in place (growing the buffers only if they are full),
    and `keys`/`values` are views of the columns written so far. DynamicLayer concatenates instead,
    copying the whole cache at every decode step."""

    def __init__(self, capacity: int = 0):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.buffers = [s.new_empty((*s.shape[:2], self.capacity, s.shape[3])) for s in (key_states, value_states)]
        self.is_initialized = True
        self._views()

    def _views(self) -> None:
        self.keys, self.values = (b[:, :, :self.length] for b in self.buffers)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.buffers[0].shape[-2]:
            self.buffers = [F.pad(b[:, :, :self.length], (0, 0, 0, max(end, 2 * b.shape[-2]) - self.length))
                            for b in self.buffers]
        for buffer, states in zip(self.buffers, (key_states, value_states)):
            buffer[:, :, self.length:end] = states
        self.length = end
        self._views()
        return self.keys, self.values

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.buffers = [b.repeat_interleave(repeats, dim=0) for b in self.buffers]
            self._views()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.buffers = [b[indices] for b in self.buffers]
            self._views()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("BufferLayer is not croppable")

    def reset(self) -> None:
        self.length = 0
        super().reset()


class KVBuffer(DynamicCache):
    """A DynamicCache whose layers are BufferLayers with room for `capacity` columns."""

    is_croppable = False

    def __init__(self, capacity: int):
        super().__init__()
        self.layer_class_to_replicate = partial(BufferLayer, capacity)


@dataclass
class CachedBatch:
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, (rows, heads, columns, head_dim)
    mask: torch.Tensor  # (rows, columns): 1 where the column holds the row's own token

    @classmethod
    def of(cls, cache: DynamicCache, mask: torch.Tensor, rows: torch.Tensor | None = None) -> CachedBatch:
        """The batch's rows (all, or a copy of `rows`) as they stand in `cache`."""
        if rows is None:
            return cls([(layer.keys, layer.values) for layer in cache.layers], mask)
        return cls([(layer.keys[rows], layer.values[rows]) for layer in cache.layers], mask[rows])


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


def gather_rows(sources: list[tuple[CachedBatch, int]], room: int) -> tuple[KVBuffer, torch.Tensor]:
    """A new cache, with room for `room` more columns, and its column mask, holding the given (batch, row) rows in order.

    Rows may come from several batches (the engine splits calls into chunks of `max_batch`, a chunk
    regroups as trajectories finish, rows that finish early leave their batch mid-turn). Each row's
    own columns are packed to the right, in their order, so the masked gaps that left padding and
    ragged turns leave between them are dropped here, once per turn: the width is the longest row's
    token count. Only a row's order of columns matters: positions are explicit and the mask hides the rest.
    """
    counts = {}  # by batch: the batch, and each of its rows' own columns
    for batch, _ in sources:
        counts.setdefault(id(batch), (batch, batch.mask.sum(1)))
    width = max(int(counts[id(batch)][1][index]) for batch, index in sources)
    first = sources[0][0]
    device = first.mask.device
    mask = first.mask.new_zeros((len(sources), width))
    data = [tuple(s.new_zeros((len(sources), s.shape[1], width + room, s.shape[3])) for s in kv) for kv in first.kv]
    for batch, _ in counts.values():
        picked = [i for i, (source, _) in enumerate(sources) if source is batch]
        rows = torch.tensor([sources[i][1] for i in picked], device=device)
        to = torch.tensor(picked, device=device)
        own = batch.mask[rows]
        keep = min(own.shape[1], width)
        columns = own.sort(dim=1, stable=True).indices[:, own.shape[1] - keep:]  # masked columns first, then the row's own
        mask[to, width - keep:] = own.gather(1, columns)
        heads = torch.arange(batch.kv[0][0].shape[1], device=device)
        for (keys, values), (new_keys, new_values) in zip(batch.kv, data):
            at = (rows[:, None, None], heads[None, :, None], columns[:, None, :])
            new_keys[to, :, width - keep:width] = keys[at]
            new_values[to, :, width - keep:width] = values[at]
    cache = KVBuffer(width + room)
    for new_keys, new_values in data:
        layer = BufferLayer(width + room)
        layer.device, layer.buffers, layer.length, layer.is_initialized = device, [new_keys, new_values], width, True
        layer._views()
        cache.layers.append(layer)
    return cache, mask


def own_column_masks(columns: torch.Tensor, queries: int, windows: dict[str, int | None],
                     eager: bool = False, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Per layer type, the (rows, 1, queries, columns) attention masks of the last `queries` columns.

    transformers builds a sliding-window mask over column indices, which is right only when a row's
    tokens sit in adjacent columns; here they have gaps (left padding, ragged deltas), so the
    window is counted in the row's own tokens instead: a query sees its row's own columns up to
    itself, and in a windowed layer only the last `window` of them (itself included). A masked
    query column (padding) sees itself only, so that no attention row is empty (which gives NaN).
    `windows` maps each layer type to its window (None: the whole causal past). True means attend;
    with `eager`, additive float masks of `dtype` instead (0 or its minimum).
    """
    own = columns.bool()
    total = own.shape[1]
    rank = own.long().cumsum(1)  # an own column's 1-based index among its row's own columns
    query_at = torch.arange(total - queries, total, device=own.device)
    key_at = torch.arange(total, device=own.device)
    causal = own[:, None, :] & (key_at[None, None, :] <= query_at[None, :, None])  # (rows, queries, columns)
    itself = key_at[None, :] == query_at[:, None]
    padding = ~own[:, total - queries:, None]
    masks = {}
    for kind, window in windows.items():
        allowed = causal
        if window is not None:
            behind = rank[:, total - queries:, None] - rank[:, None, :]  # own tokens between query and key
            allowed = allowed & (behind < window)
        allowed = torch.where(padding, itself, allowed)[:, None]
        if eager:
            allowed = torch.zeros(allowed.shape, dtype=dtype, device=own.device).masked_fill(~allowed, torch.finfo(dtype).min)
        masks[kind] = allowed
    return masks
