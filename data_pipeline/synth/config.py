"""Config schemas for `mmsearch synth` and `mmsearch synth import` (plain data; see configs/synth/)."""

from __future__ import annotations

from dataclasses import dataclass, field

from mmsearch.agent.config import AgentConfig
from tools.config import ToolsConfig


@dataclass
class MixConfig:
    """The configured mix. Shares are normalised; a share of 0 turns a category off."""

    search_free: float = 0.5  # share of questions answerable by looking (the rest need search); image modality only
    hops: dict[int, float] = field(default_factory=lambda: {1: 0.4, 2: 0.4, 3: 0.2})  # among search-required
    crop: float = 0.5  # share of search-required questions about one object of a scene (the rest: a whole entity image)
    # text modality: share of questions whose first entity is described by one of its facts or relations,
    # unique in the KB, so the first hop is a search (the rest name it)
    described: float = 0.3
    visual: dict[str, float] = field(  # among search-free
        default_factory=lambda: {"count": 0.25, "position": 0.25, "picture": 0.25, "colour": 0.25})
    # the first entity's kinds (image modality: the pictured one); empty: every kind (with images), equally
    kinds: dict[str, float] = field(default_factory=dict)
    facts: float = 0.3  # share of 2-3 hop questions whose last hop is a literal fact (a year, a population)


@dataclass
class SplitConfig:
    """Entity-disjoint splits: entities are partitioned first, and each example uses one part only."""

    validation: float = 0.1
    test: float = 0.1
    # Held-out entities are grown as connected neighbourhoods of about this many entities, so
    # multi-hop chains exist inside every split.
    region_size: int = 12


@dataclass
class SceneConfig:
    """Scenes are composed from the split's own entity images, so crops never leak across splits."""

    width: int = 448
    height: int = 336
    objects: list[int] = field(default_factory=lambda: [2, 4])  # min, max per scene
    questions_per_scene: int = 6  # scene pool size = scene questions / this (rendering is most of synthesis time)
    # Search-free questions about one picture (its kind, its colour) crop the grid cell the question
    # names first, then answer from the crop: a small policy reads one picture far better than a
    # whole scene (README, "Reading crops").
    read_crops: bool = False


@dataclass
class FilterConfig:
    dedup: bool = True  # normalised question + image hash
    answer_in_question: bool = True  # drop when an answer alias appears in the question
    max_tool_calls: int = 4
    identify_top_k: int = 1  # the pictured entity must be among the top-k image-search matches
    # drop training rows whose messages (tool results included) name a validation or test entity
    held_out_text: bool = True


@dataclass
class GoldConfig:
    """How gold trajectories are worded; the tool calls and their order are the candidate's path either way."""

    # full: each turn comments on the last result (quoting the evidence sentence) and states its intent.
    # terse: a few-word thought and one canonical query per relation, so a small policy has little to
    # copy besides what the action needs (a name from the last result, the question's relation words).
    think: str = "full"
    # Write every name the policy copies after a space, as the tools print it: terse queries end with
    # the name ("headquarters of X", not "X headquarters") and answers are `<answer> X</answer>`.
    # Byte-level BPE gives a word after a space other tokens than the same word after `"` or `>`, so
    # otherwise a copied name's first token is one the context does not hold (README, "Copy circuits").
    names_after_space: bool = False
    image_k: int = 0  # > 0: image_search calls ask for this many matches (0: the tool's default)
    text_k: int = 0  # > 0: text_search calls ask for this many passages


@dataclass
class RewriteConfig:
    """Optional rewording by an LLM behind an OpenAI-compatible endpoint."""

    api_base: str = ""  # empty: off
    model: str = ""
    api_key: str = ""
    share: float = 1.0  # share of questions sent for rewriting
    temperature: float = 0.7


@dataclass
class TeacherConfig:
    """Teacher mode: the agent loop with an `openai` engine; keep a correct trajectory (rejection sampling)."""

    api_base: str = ""
    model: str = ""
    api_key: str = ""
    samples: int = 4  # tries per question
    temperature: float = 0.7
    match: str = "exact_match"  # exact_match | substring


@dataclass
class SynthConfig:
    kb: str = "runs/world"
    index: str = "runs/index"  # in-process search ...
    server: list[str] = field(default_factory=list)  # ... or tool-server URLs
    out: str = "runs/dataset"
    n: int = 1000
    seed: int = 0
    # image: the first entity is pictured (questions have an image; search-free kinds too);
    # text: it is named or described in words (no images, text_search only; see text_questions.py)
    modality: str = "image"
    # gold: a planner that knows the answer path runs the real tools; teacher: see TeacherConfig;
    # none: questions only (no tools run, evidence not checked).
    trajectories: str = "gold"
    # The policy's processor dir: crop boxes in gold trajectories are in the pixels it resizes to.
    # Empty: tools.vision as configured (Qwen2.5-VL's defaults).
    processor: str = ""
    chunk: int = 64  # examples planned, run through the tools and written together
    max_attempts: float = 4.0  # candidates tried per wanted example before a category is given up
    sharegpt: bool = False  # also write the LLaMA-Factory multimodal ShareGPT export
    mix: MixConfig = field(default_factory=MixConfig)
    splits: SplitConfig = field(default_factory=SplitConfig)
    scenes: SceneConfig = field(default_factory=SceneConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    gold: GoldConfig = field(default_factory=GoldConfig)
    rewrite: RewriteConfig = field(default_factory=RewriteConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    tools: ToolsConfig = field(default_factory=ToolsConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)


@dataclass
class ImportConfig:
    """`mmsearch synth import`: InfoSeek-style (image, entity, question, answers) records to a dataset dir."""

    records: str = ""  # JSONL file(s), comma-separated
    image_root: str = ""  # where <image_id>.jpg (or .png/.jpeg) lives
    out: str = "runs/imported"
    seed: int = 0
    splits: SplitConfig = field(default_factory=SplitConfig)
