"""`mmsearch sft` config (plain data; filled from configs/sft/*.yaml by `load_config`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from mmsearch.sft.copying import CopyRowsConfig
from mmsearch.sft.reading import ReadingRowsConfig
from mmsearch.training.config import FreezeConfig, LoraConfig, OptimConfig, PeriodicEvalConfig
from mmsearch.training.parallel import check_deepspeed
from mmsearch.training.schedule import check_optim


@dataclass
class BatchConfig:
    tokens_per_batch: int = 8192  # padded tokens per micro-batch (per rank); must be >= max_seq_tokens
    grad_accum: int = 1  # micro-batches per rank per optimizer step
    max_seq_tokens: int = 4096  # longer samples are skipped and counted
    max_tool_response_tokens: int = 512  # tool text is clipped as the agent loop clips it
    # Run the prompt prefix all rows share (the system prompt) once per micro-batch; off with gradient checkpointing.
    share_prefix: bool = True


@dataclass
class SFTConfig:
    model: str = "runs/policy"  # a Qwen2-VL / Qwen2.5-VL / Qwen3-VL dir or hub name (with its processor)
    data: str = "runs/dataset"  # a dataset dir from `mmsearch synth` (rows with gold `messages`); "": copy rows only
    train_split: str = "train"
    # The protocol the gold rows are rendered in (mmsearch/protocols); the periodic eval speaks it too.
    protocol: str = "qwen_tools"
    out: str = "runs/sft"
    seed: int = 0
    epochs: int = 1
    max_steps: int = 0  # > 0: stop after this many optimizer steps (the schedule spans them)
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "fp32"  # fp32 | bf16 (autocast; weights and optimizer state stay fp32)
    gradient_checkpointing: bool = False
    deepspeed: str = ""  # a DeepSpeed JSON (configs/deepspeed/zero2.json, zero3.json); empty: DDP / one process
    batch: BatchConfig = field(default_factory=BatchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    log_every: int = 10
    save_every: int = 0  # optimizer steps between checkpoints; 0: only the final one
    keep_checkpoints: int = 2  # older step checkpoints are deleted (the final one always stays)
    eval: PeriodicEvalConfig = field(default_factory=PeriodicEvalConfig)
    # Share of training rows that also get a copy with every entity renamed (mmsearch/sft/augment.py);
    # `name_swap_kb`: the KB dir for the names of swaps and reading rows (empty: the one the dataset's
    # synth_info.json records).
    name_swap: float = 0.0
    name_swap_kb: str = ""
    # Rows of random vocabulary ids read and written back, added to the samples (mmsearch/sft/copying.py).
    copy_rows: CopyRowsConfig = field(default_factory=CopyRowsConfig)
    # Fragments of renamed rows: a text tool result and the turn that copies a name out of it (mmsearch/sft/reading.py).
    reading_rows: ReadingRowsConfig = field(default_factory=ReadingRowsConfig)

    def check(self) -> None:
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {self.precision!r}")
        check_optim(self.optim)
        if self.deepspeed and check_deepspeed(self.deepspeed, self.lora.r) == 3 and (
                self.copy_rows.rows or self.reading_rows.rows):
            raise ValueError(f"deepspeed={self.deepspeed} is ZeRO-3, whose ranks must run the same modules in every "
                             "micro-batch; copy and reading rows hold no image, so the vision tower would run on one "
                             "rank and not on another. Set copy_rows.rows=0 and reading_rows.rows=0, or use "
                             "configs/deepspeed/zero2.json")
        self.copy_rows.check()
        self.reading_rows.check()
        if self.reading_rows.rows and not self.data:
            raise ValueError("reading_rows are cut from the dataset's rows: set data")
        if not self.data and not self.copy_rows.rows:
            raise ValueError("set data (a dataset dir) or copy_rows.rows > 0: there is nothing to train on")
        if not self.data and self.eval.enabled:
            raise ValueError("eval needs data (its validation split): set eval.enabled: false for a copy stage")
        if self.batch.tokens_per_batch < self.batch.max_seq_tokens:
            raise ValueError(f"batch.tokens_per_batch ({self.batch.tokens_per_batch}) must be >= batch.max_seq_tokens "
                             f"({self.batch.max_seq_tokens}) so the longest sample fits a micro-batch")
        if self.batch.grad_accum < 1:
            raise ValueError("batch.grad_accum must be >= 1")
        if self.epochs < 1 and self.max_steps <= 0:
            raise ValueError("set epochs >= 1 or max_steps > 0")
