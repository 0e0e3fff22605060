"""`mmsearch rl` config (plain data; filled from configs/rl/*.yaml by `load_config`)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from mmsearch.agent.config import AgentConfig, SamplingConfig
from mmsearch.rewards import RewardConfig
from mmsearch.rl.algos import ADVANTAGE_ESTIMATORS, AGGREGATION_MODES, KL_KINDS
from mmsearch.training.config import FreezeConfig, LoraConfig, OptimConfig, PeriodicEvalConfig
from mmsearch.training.parallel import check_deepspeed
from mmsearch.training.schedule import check_optim
from tools.config import ToolsConfig


@dataclass
class VLLMSettings:
    """The `vllm` rollout engine: one vLLM instance per rank, in the trainer's process, on the rank's GPU.

    It generates with its own copy of the policy (dtype below); the trainer pushes its weights into it after
    every optimizer step. Between rollouts it sleeps, so scoring and the update get its memory back.
    """

    gpu_memory_utilization: float = 0.3  # share of the GPU vLLM may fill with its weights and KV cache
    sleep_level: int = 1  # between rollouts: 0 stays resident; 1 weights to CPU memory, KV cache freed; 2 both freed
    dtype: str = "auto"  # auto: the trainer's precision (bf16 -> bf16, fp32 -> fp32) | bf16 | fp16 | fp32
    max_model_len: int = 0  # tokens per sequence; 0: rollout.agent.max_total_tokens
    enforce_eager: bool = False  # True: no CUDA graphs (less memory and start-up time, slower decoding)
    weight_chunk_mb: int = 1024  # a weight push loads at most this many MiB per load_weights call


@dataclass
class RolloutSettings:
    """How trajectories are generated: the engine, the loop's limits and the sampling."""

    # hf: generate with the very module being trained (no copy, nothing to sync); vllm: a colocated vLLM
    # copy on the same GPU (CUDA only), weights pushed after every update (rollout.vllm)
    engine: str = "hf"
    prompts_per_step: int = 8  # B: questions per step
    group_size: int = 4  # G: samples per question (one group)
    max_batch: int = 64  # trajectories per engine call (hf); sequences vLLM runs at once (vllm)
    agent: AgentConfig = field(default_factory=lambda: AgentConfig(sampling=SamplingConfig(temperature=1.0)))
    tools: ToolsConfig = field(default_factory=ToolsConfig)
    vllm: VLLMSettings = field(default_factory=VLLMSettings)


@dataclass
class AlgorithmConfig:
    advantage: str = "grpo"  # grpo | drgrpo | rloo | reinforce_pp | reinforce_pp_baseline | gae (PPO with a critic)
    ppo_epochs: int = 1  # K: passes over a step's trajectories
    mini_batches: int = 1  # optimizer updates per pass (the step's trajectories split evenly)
    tokens_per_micro_batch: int = 8192  # padded tokens per forward/backward (bounds memory)
    clip_low: float = 0.2  # ratio clipped to [1 - clip_low, 1 + clip_high]; DAPO's clip-higher: clip_high 0.28
    clip_high: float = 0.2
    dual_clip: float = 0.0  # > 1 (e.g. 3): caps the loss of negative-advantage tokens at -dual_clip * A; 0: off
    ratio_level: str = "token"  # token (PPO/GRPO) | sequence (GSPO)
    loss_agg: str = "token-mean"  # token-mean | seq-mean-token-mean | seq-mean-token-sum | seq-mean-token-sum-norm
    norm_len: int = 0  # seq-mean-token-sum-norm's constant (Dr. GRPO); 0: the trajectory token limit
    kl_coef: float = 0.0  # 0: no reference model is loaded at all
    kl_estimator: str = "k3"  # k1 | k2 | k3 (low_var_kl)
    kl_in_reward: bool = False  # False: a loss term (GRPO); True: subtracted from the reward (PPO, Search-R1)
    entropy_coef: float = 0.0  # > 0: an entropy bonus
    # The log-probs the PPO ratio divides by. auto: the trainer's before the update, without a separate pass when
    # the step is exactly on-policy -- ppo_epochs = mini_batches = 1 (every trajectory is trained once, by the
    # weights that generated it, before the only optimizer step), the engine is the trained module (hf), no
    # critic (gae), no KL in the reward (it needs them before the update), lld_coef = 0 (its hinge sits at its
    # kink there, where float noise alone would pick the gradient) and no LoRA dropout (a second forward would
    # draw another mask) -- then they are the training forward's own, detached (ratio exactly 1: the clipped
    # surrogate's gradient is the plain policy gradient); otherwise a no-grad forward recomputes them before
    # the update. recompute: always that forward. engine: the rollout engine's own. The trainer's log-probs
    # that the mismatch metrics and TIS compare the engine's with come as with auto in every case.
    old_logprobs: str = "auto"  # auto | recompute | engine
    tis_cap: float = 0.0  # > 0: truncated importance sampling on the trainer/engine ratio, capped here
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal, refill to B
    max_refills: int = 3  # extra rollout rounds a step may take to refill
    overlong: str = "none"  # none | filter (cut trajectories carry no loss) | penalty (DAPO soft punishment)
    overlong_buffer: int = 128  # penalty: tokens before the limit where it starts
    overlong_penalty: float = 1.0  # penalty: its value at the limit
    lld_coef: float = 0.0  # > 0: likelihood-preserving term on non-negative-advantage trajectories (LLDS-style)
    gamma: float = 1.0  # gae
    lam: float = 1.0  # gae


@dataclass
class CriticConfig:
    """PPO's value model (advantage=gae only): the policy's trunk with a scalar head, trained beside it."""

    lr: float = 1e-5
    value_clip: float = 0.5  # clipped value loss (PPO); 0: unclipped
    warmup_steps: int = 0  # steps that train only the critic (the policy waits for a useful baseline)


@dataclass
class GuardConfig:
    """Stops (or rolls back) a run that has clearly collapsed; see `mmsearch.rl.guard`."""

    enabled: bool = True
    action: str = "stop"  # stop | rollback (to the last checkpoint, then continue with the next data)
    patience: int = 3  # consecutive bad steps before acting (a non-finite loss acts at once)
    max_invalid_share: float = 0.9  # share of trajectories with an invalid action (gibberish) ...
    reward_drop: float = 0.2  # ... or mean reward below this share of the best 3-step mean so far ...
    min_best_reward: float = 0.05  # ... (once that best is above this)
    max_entropy_ratio: float = 0.75  # ... or mean token entropy above this share of log(vocab size)
    max_rollbacks: int = 2


@dataclass
class RLConfig:
    model: str = "runs/sft/final"  # the policy to start from: an SFT dir or a base Qwen2/2.5/3-VL checkpoint
    data: str = "runs/dataset"  # a dataset dir (train split for training, validation for eval)
    train_split: str = "train"
    index: str = "runs/index"  # in-process tools over this index dir ...
    server: list[str] = field(default_factory=list)  # ... or these tool-server URLs
    out: str = "runs/rl"
    seed: int = 0
    steps: int = 100
    device: str = "auto"
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    gradient_checkpointing: bool = False
    # A DeepSpeed JSON (configs/deepspeed/zero2.json: optimizer state and gradients sharded over the ranks);
    # empty: DDP / one process. ZeRO-3 is refused: rollouts and eval generate with the weights it would partition.
    deepspeed: str = ""
    rollout: RolloutSettings = field(default_factory=RolloutSettings)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    # No default weights: YAML dicts merge into defaults, so a recipe could never drop a default component.
    rewards: RewardConfig = field(default_factory=lambda: RewardConfig(weights={}))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6, weight_decay=0.0, schedule="constant"))
    critic: CriticConfig = field(default_factory=CriticConfig)
    freeze: FreezeConfig = field(default_factory=lambda: FreezeConfig(vision_tower=True))
    lora: LoraConfig = field(default_factory=LoraConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    logger: list[str] = field(default_factory=lambda: ["jsonl", "tensorboard"])  # + wandb
    log_trajectories: int = 4  # trajectories written per step to trajectories/step-N.jsonl (one per group first)
    # Steps between likelihood-displacement probes (lld/* metrics: an extra no-grad forward over the A >= 0
    # trajectories after the update, on steps that are a multiple of this); 0: never
    lld_probe_every: int = 5
    save_every: int = 0  # steps between checkpoints; 0: only the final one
    keep_checkpoints: int = 2
    eval: PeriodicEvalConfig = field(default_factory=PeriodicEvalConfig)

    def check(self) -> None:
        a = self.algorithm
        choices = {
            "advantage": (a.advantage, (*ADVANTAGE_ESTIMATORS, "gae")),
            "loss_agg": (a.loss_agg, AGGREGATION_MODES),
            "kl_estimator": (a.kl_estimator, KL_KINDS),
            "ratio_level": (a.ratio_level, ("token", "sequence")),
            "old_logprobs": (a.old_logprobs, ("auto", "recompute", "engine")),
            "overlong": (a.overlong, ("none", "filter", "penalty")),
        }
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"algorithm.{key} must be one of {', '.join(allowed)}, got {value!r}")
        if self.guard.action not in ("stop", "rollback"):
            raise ValueError(f"guard.action must be stop or rollback, got {self.guard.action!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {self.precision!r}")
        unknown = set(self.logger) - {"jsonl", "tensorboard", "wandb"}
        if unknown:
            raise ValueError(f"logger: unknown {sorted(unknown)}; choose from jsonl, tensorboard, wandb")
        check_optim(self.optim)
        if self.deepspeed and check_deepspeed(self.deepspeed, self.lora.r) == 3:
            raise ValueError(f"deepspeed={self.deepspeed} is ZeRO-3: it partitions the weights the hf engine generates "
                             "with and the eval runs on; use configs/deepspeed/zero2.json (optimizer state and "
                             "gradients sharded, weights whole on every rank)")
        if not self.rewards.weights:
            raise ValueError("rewards.weights is empty: say what the reward is, e.g. rewards.weights={exact_match: 1.0} "
                             "(see configs/rl/*.yaml)")
        r = self.rollout
        if r.prompts_per_step < 1 or r.group_size < 1:
            raise ValueError("rollout.prompts_per_step and rollout.group_size must be >= 1")
        if a.advantage != "gae" and r.group_size < 2:
            raise ValueError(f"advantage={a.advantage} compares samples of one question: rollout.group_size must be >= 2")
        if self.lld_probe_every < 0:
            raise ValueError(f"lld_probe_every must be >= 0 (0: no probe), got {self.lld_probe_every}")
        if a.mini_batches < 1 or a.ppo_epochs < 1:
            raise ValueError("algorithm.mini_batches and algorithm.ppo_epochs must be >= 1")
        if r.engine == "openai":
            raise ValueError("rollout.engine=openai is a chat-level engine: it returns text, not the token ids and "
                             "log-probs RL trains on (DESIGN.md invariant 1); use hf")
        if r.engine not in ("hf", "vllm"):
            raise ValueError(f"rollout.engine={r.engine!r}: RL rolls out with hf (the module being trained) or vllm "
                             "(a colocated copy, weights pushed after every update)")
        if r.engine == "vllm":
            self._check_vllm()
        if r.agent.sampling.temperature <= 0:
            raise ValueError("rollout.agent.sampling.temperature must be > 0: RL needs sampled, not greedy, rollouts")

    def _check_vllm(self) -> None:
        v, a = self.rollout.vllm, self.algorithm
        if self.device == "cpu":
            raise ValueError("rollout.engine=vllm needs a CUDA GPU (device=cpu): use rollout.engine=hf on a CPU")
        if not 0 < v.gpu_memory_utilization < 1:
            raise ValueError(f"rollout.vllm.gpu_memory_utilization must be in (0, 1): it is the share of the GPU "
                             f"vLLM takes beside the trainer, got {v.gpu_memory_utilization}")
        if v.sleep_level not in (0, 1, 2):
            raise ValueError(f"rollout.vllm.sleep_level must be 0 (stay resident), 1 or 2, got {v.sleep_level}")
        if v.dtype not in ("auto", "bf16", "fp16", "fp32"):
            raise ValueError(f"rollout.vllm.dtype must be one of auto, bf16, fp16, fp32, got {v.dtype!r}")
        if v.max_model_len < 0 or v.weight_chunk_mb < 1:
            raise ValueError("rollout.vllm.max_model_len must be >= 0 and rollout.vllm.weight_chunk_mb >= 1")
        # A separate engine's log-probs differ from the trainer's even on the same weights (other kernels, often
        # another dtype). DESIGN.md invariant 4: that difference is corrected, never ignored.
        if a.old_logprobs == "engine":
            if a.tis_cap > 0:
                raise ValueError("algorithm.old_logprobs=engine already divides by the engine's log-probs (the ratio "
                                 "is taken to the vLLM policy that sampled); tis_cap > 0 would correct the same "
                                 "mismatch twice. Use old_logprobs=auto with tis_cap, or engine with tis_cap=0")
            warnings.warn("rollout.engine=vllm with algorithm.old_logprobs=engine: the PPO ratio then also measures "
                          "the engine's numerics, and the clip drops tokens where vLLM and the trainer differ by more "
                          "than the clip range; old_logprobs=auto with tis_cap (e.g. 2.0) keeps the two apart",
                          stacklevel=3)
        elif a.tis_cap <= 0:
            raise ValueError("rollout.engine=vllm samples from a separate copy whose log-probs differ from the "
                             "trainer's: set algorithm.tis_cap (e.g. 2.0) so truncated importance sampling corrects "
                             "for it (DESIGN.md invariant 4), or algorithm.old_logprobs=engine to take the ratio to "
                             "the engine's own log-probs")
