"""`mmsearch synth`: stream candidates per split, run their gold trajectories, filter, write, export.

Work goes to `<out>/work/` in chunks: a chunk's candidates are planned, reworded (optionally), filtered,
run through the real tools together (one batched agent loop), checked for evidence, and the
survivors are appended to `examples.jsonl`; then `state.json` records how far the run got. A killed
run therefore resumes from its last chunk without duplicates, and because every random choice is
keyed by (seed, split, candidate number), the resumed dataset is the one an uninterrupted run makes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from data_pipeline.synth.config import MixConfig, SynthConfig
from data_pipeline.synth.filters import HeldOutNames, answer_in_question, dedup_key, filter_reason, message_texts
from data_pipeline.synth.graph import EntityGraph
from data_pipeline.synth.planner import check_evidence, gold_writer
from data_pipeline.synth.questions import VISUAL_KINDS, Candidate, Category, make_candidate
from data_pipeline.synth.records import HOP_COUNT, SPLITS, FileHashes
from data_pipeline.synth.scenes import ScenePool
from data_pipeline.synth.splits import partition_entities
from data_pipeline.synth.text_questions import KBNames, TextQuestions
from data_pipeline.world.seeding import derive_rng
from mmsearch.config import to_yaml
from mmsearch.example import Example

TRAJECTORY_MODES = ("gold", "teacher", "none")
MODALITIES = ("image", "text")


@dataclass
class SplitState:
    attempts: int = 0
    accepted: Counter = field(default_factory=Counter)  # category name -> kept examples
    kinds: Counter = field(default_factory=Counter)  # pictured kind -> kept search-required examples
    tried: Counter = field(default_factory=Counter)  # category name -> candidates tried
    exhausted: list[str] = field(default_factory=list)  # categories given up (too many failures)

    @property
    def total(self) -> int:
        return sum(self.accepted.values())


@dataclass
class RunState:
    config_hash: str
    bytes_written: int = 0  # examples.jsonl length at the last completed chunk
    splits: dict[str, SplitState] = field(default_factory=lambda: {s: SplitState() for s in SPLITS})
    dropped: Counter = field(default_factory=Counter)  # reason -> candidates dropped
    rewrites: Counter = field(default_factory=Counter)  # rewrite status -> count
    done: bool = False

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        splits = {name: {"attempts": s.attempts, "accepted": dict(s.accepted), "kinds": dict(s.kinds),
                         "tried": dict(s.tried), "exhausted": s.exhausted} for name, s in self.splits.items()}
        data = {"config_hash": self.config_hash, "bytes_written": self.bytes_written, "splits": splits,
                "dropped": dict(self.dropped), "rewrites": dict(self.rewrites), "done": self.done}
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> RunState:
        raw = json.loads(path.read_text())
        splits = {name: SplitState(s["attempts"], Counter(s["accepted"]), Counter(s["kinds"]), Counter(s["tried"]),
                                   s["exhausted"]) for name, s in raw["splits"].items()}
        return cls(raw["config_hash"], raw["bytes_written"], splits, Counter(raw["dropped"]),
                   Counter(raw["rewrites"]), raw["done"])


def largest_remainder(total: int, shares: dict) -> dict:
    """Integer counts summing to `total`, proportional to `shares` (zero shares get zero)."""
    positive = {k: float(v) for k, v in shares.items() if v > 0}
    if not positive or total <= 0:
        return {k: 0 for k in shares}
    exact = {k: total * v / sum(positive.values()) for k, v in positive.items()}
    counts = {k: int(x) for k, x in exact.items()}
    for k in sorted(positive, key=lambda k: -(exact[k] - counts[k]))[: total - sum(counts.values())]:
        counts[k] += 1
    return {k: counts.get(k, 0) for k in shares}


def category_targets(n: int, mix: MixConfig, modality: str = "image") -> dict[Category, int]:
    """How many examples of each category a split of `n` examples should have. The text modality has
    search-required categories only: hops x (named | described)."""
    shares: dict[Category, float] = {}
    if modality == "text":
        if not 0 <= mix.described <= 1:
            raise ValueError(f"mix.described is a share from 0 to 1, got {mix.described}")
        for hops, share in _hop_shares(mix).items():
            for view, view_share in (("named", 1 - mix.described), ("described", mix.described)):
                shares[Category(True, hops, view)] = share / sum(mix.hops.values()) * view_share
        return {c: k for c, k in largest_remainder(n, shares).items() if k > 0}
    for visual, share in mix.visual.items():
        if visual not in VISUAL_KINDS:
            raise ValueError(f"mix.visual: unknown kind {visual!r}; choose from {', '.join(VISUAL_KINDS)}")
        shares[Category(False, visual=visual)] = mix.search_free * share / sum(mix.visual.values())
    for hops, share in _hop_shares(mix).items():
        for view, view_share in (("whole", 1 - mix.crop), ("crop", mix.crop)):
            shares[Category(True, hops, view)] = (1 - mix.search_free) * share / sum(mix.hops.values()) * view_share
    return {c: k for c, k in largest_remainder(n, shares).items() if k > 0}


def _hop_shares(mix: MixConfig) -> dict[int, float]:
    """mix.hops with int keys (YAML may give strings), checked."""
    for hops in mix.hops:
        if not 1 <= int(hops) <= 3:
            raise ValueError(f"mix.hops: hop counts are 1 to 3, got {hops}")
    return {int(hops): share for hops, share in mix.hops.items()}


def config_hash(cfg: SynthConfig, kb_fingerprint: str) -> str:
    """What decides the dataset's content: the config and the KB's records (not where the dataset is
    written, nor how the tools are reached)."""
    data = json.loads(json.dumps(asdict(cfg), default=str))
    for key in ("out", "server"):
        data.pop(key)
    data["kb_fingerprint"] = kb_fingerprint
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


class Synthesizer:
    def __init__(self, cfg: SynthConfig, toolbox=None, progress: bool = True):
        if cfg.trajectories not in TRAJECTORY_MODES:
            raise ValueError(f"trajectories must be one of {', '.join(TRAJECTORY_MODES)}, got {cfg.trajectories!r}")
        if cfg.trajectories == "teacher" and not cfg.teacher.api_base:
            raise ValueError("trajectories=teacher needs teacher.api_base (an OpenAI-compatible endpoint)")
        if cfg.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {', '.join(MODALITIES)}, got {cfg.modality!r}")
        self.cfg, self.progress = cfg, progress
        self.text = cfg.modality == "text"
        self.graph = EntityGraph.load(cfg.kb)
        # The same partition in both modalities, so a text set and an image set made with one seed
        # hold out the same entities.
        self.parts = partition_entities(self.graph, cfg.splits, cfg.seed)
        self.out, self.work = Path(cfg.out), Path(cfg.out) / "work"
        self.vision = cfg.tools.vision if self.text else _vision(cfg)  # text questions have no crop boxes
        if cfg.processor:  # gold trajectories carry the system prompt the policy they are for records
            from mmsearch.agent.setup import use_recorded_prompt

            use_recorded_prompt(cfg.agent, cfg.processor)
        self.names = KBNames(self.graph) if self.text else None
        held_out = self.parts["validation"] | self.parts["test"]
        self.held_out_names = HeldOutNames([n for e in sorted(held_out) for n in self.graph.entities[e].answers])
        self._toolbox = toolbox
        self.hashes = FileHashes()

    @property
    def toolbox(self):
        """The tools trajectories run on; in the text modality text_search alone (what the system prompt lists)."""
        if self._toolbox is None:
            from tools.registry import build_toolbox, open_backend

            if self.text:
                self.cfg.tools.enabled = ["text_search"]
            self.cfg.tools.vision = self.vision
            self._toolbox = build_toolbox(self.cfg.tools, open_backend(self.cfg.index, self.cfg.server, self.cfg.tools))
        elif self.text and list(self._toolbox.tools) != ["text_search"]:
            from tools.base import Toolbox

            if "text_search" not in self._toolbox.tools:
                raise ValueError("modality=text needs a toolbox with text_search")
            self._toolbox = Toolbox([self._toolbox.tools["text_search"]], timeout_s=self._toolbox.timeout_s)
        return self._toolbox

    # -- the run ---------------------------------------------------------------------------

    def run(self) -> dict:
        from data_pipeline.synth.export import export_dataset

        state, examples_file = self._open_work()
        seen = {_key_of(row, self.hashes) for row in _read_rows(examples_file)} if self.cfg.filters.dedup else set()
        targets = largest_remainder(self.cfg.n, {"train": 1 - self.cfg.splits.validation - self.cfg.splits.test,
                                                 "validation": self.cfg.splits.validation, "test": self.cfg.splits.test})
        start = time.perf_counter()
        for split in SPLITS:
            self._run_split(split, targets[split], state, examples_file, seen)
        state.done = True
        state.save(self.work / "state.json")
        generated = time.perf_counter()
        rows = list(_read_rows(examples_file))
        info = self._info(state, targets)
        summary = export_dataset(self.out, rows, info, sharegpt=self.cfg.sharegpt, hashes=self.hashes)
        timings = {"generate_s": generated - start, "export_s": time.perf_counter() - generated}
        return {**summary, "dropped": dict(state.dropped), "mix": info["mix"], "timings": timings}

    def _open_work(self) -> tuple[RunState, Path]:
        self.work.mkdir(parents=True, exist_ok=True)
        examples_file, state_file = self.work / "examples.jsonl", self.work / "state.json"
        digest = config_hash(self.cfg, self.graph.fingerprint)
        if state_file.exists():
            state = RunState.load(state_file)
            if state.config_hash != digest:
                raise ValueError(f"{self.out} holds a synth run with a different config (hash {state.config_hash}, "
                                 f"now {digest}); use a new --out or delete it")
            with examples_file.open("ab") as f:  # drop a chunk that was being written when the run died
                f.truncate(state.bytes_written)
        else:
            state = RunState(digest)
            examples_file.write_bytes(b"")
            (self.work / "config.yaml").write_text(to_yaml(self.cfg))
        return state, examples_file

    def _run_split(self, split: str, n: int, state: RunState, examples_file: Path, seen: set[str]) -> None:
        cfg, progress = self.cfg, state.splits[split]
        targets = category_targets(n, cfg.mix, cfg.modality)
        kinds = self._kind_targets(split, sum(k for c, k in targets.items() if c.requires_search))
        make = self._candidate_maker(split, n, targets, kinds)
        bar = tqdm(total=n, initial=progress.total, desc=f"synth {split}", unit="ex", disable=not self.progress)
        while progress.total < n and _open_categories(targets, progress):
            chunk = self._plan_chunk(split, targets, kinds, progress, make, state)
            kept = self._trajectories(chunk, state)
            with examples_file.open("a", encoding="utf-8") as f:
                for candidate, messages, tool_images in kept:
                    if progress.total >= n or progress.accepted[candidate.category.name] >= targets[candidate.category]:
                        state.dropped["balance: category already full"] += 1
                        continue
                    if split == "train" and cfg.filters.held_out_text and messages and any(
                            self.held_out_names.find(text) for text in message_texts(messages)):
                        state.dropped["filter: held-out entity in a training row"] += 1
                        continue
                    if cfg.filters.dedup:
                        key = dedup_key(candidate.question, candidate.images, self.hashes)
                        if key in seen:
                            state.dropped["filter: duplicate"] += 1
                            continue
                        seen.add(key)
                    row = self._row(split, progress.total, candidate, messages, tool_images)
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                    progress.accepted[candidate.category.name] += 1
                    if candidate.category.requires_search:
                        progress.kinds[candidate.kind] += 1
                    bar.update(1)
                f.flush()
                os.fsync(f.fileno())
            state.bytes_written = examples_file.stat().st_size
            state.save(self.work / "state.json")
        bar.close()

    def _candidate_maker(self, split: str, n: int, targets: dict[Category, int], kinds: dict[str, int]):
        """(category, kind, rng) -> a candidate of the split, or None."""
        cfg = self.cfg
        if self.text:
            wanted = {kind for kind, k in kinds.items() if k > 0} if cfg.mix.kinds else None
            questions = TextQuestions(self.graph, self.names, self.parts[split], wanted)
            return lambda category, kind, rng: questions.candidate(category, kind, cfg.mix.facts, rng)
        scene_share = sum(k for c, k in targets.items() if c.view in ("crop", "")) / max(1, n)
        scenes = ScenePool(self.graph, self.parts[split], cfg.scenes, cfg.seed, split, self.work / "scenes")
        scene_count = max(1, math.ceil(n * scene_share / cfg.scenes.questions_per_scene))
        return lambda category, kind, rng: make_candidate(self.graph, category, kind, self.parts[split], scenes,
                                                          scene_count, self.vision, cfg.mix.facts, rng)

    def _kind_targets(self, split: str, n_search: int) -> dict[str, int]:
        firsts = self.parts[split] if self.text else self.graph.pictured(self.parts[split])
        available = sorted({self.graph.entities[e].kind for e in firsts})
        shares = {k: self.cfg.mix.kinds.get(k, 0.0 if self.cfg.mix.kinds else 1.0) for k in available}
        return largest_remainder(n_search, shares)

    def _plan_chunk(self, split, targets, kind_targets, progress: SplitState, make, state):
        """Up to `chunk` candidates that pass the filters, chosen where the split is furthest from its mix."""
        cfg = self.cfg
        planned: list[Candidate] = []
        pending, pending_kinds = Counter(), Counter()
        for _ in range(cfg.chunk):
            fill = _open_categories(targets, progress, pending)
            if not fill:
                break
            category = min(fill, key=lambda c: (fill[c], c.name))
            kind = None
            if category.requires_search and kind_targets:
                kind = min(kind_targets, key=lambda k: ((progress.kinds[k] + pending_kinds[k]) / max(1, kind_targets[k]), k))
            rng = derive_rng(cfg.seed, "candidate", split, progress.attempts)
            progress.attempts += 1
            progress.tried[category.name] += 1
            candidate = make(category, kind, rng)
            if progress.tried[category.name] > cfg.max_attempts * targets[category] + 20:
                progress.exhausted.append(category.name)
            if candidate is None:
                state.dropped[f"no candidate: {category.name}"] += 1
                continue
            planned.append(candidate)
            pending[category.name] += 1
            if category.requires_search:
                pending_kinds[candidate.kind] += 1
        if cfg.rewrite.api_base:
            self._rewrite(planned, split, progress.attempts, state)
        kept = []
        for candidate in planned:
            reason = filter_reason(candidate, cfg.filters)
            if reason:
                state.dropped[reason] += 1
            else:
                kept.append(candidate)
        return kept

    def _rewrite(self, candidates: list[Candidate], split: str, chunk_id: int, state: RunState) -> None:
        from data_pipeline.synth.rewrite import RewriteItem, rewrite_questions

        rng = derive_rng(self.cfg.seed, "rewrite", split, chunk_id)
        chosen = [c for c in candidates if rng.random() < self.cfg.rewrite.share]
        items = [RewriteItem(c.question, c.answers, c.meta.get("keep", [])) for c in chosen]
        for candidate, result in zip(chosen, rewrite_questions(items, self.cfg.rewrite, self.cfg.seed)):
            state.rewrites[result.status] += 1
            if result.status == "rewritten" and not answer_in_question(result.question, candidate.answers):
                candidate.meta["template_question"] = candidate.question
                candidate.question = result.question

    def _trajectories(self, chunk: list[Candidate], state: RunState) -> list[tuple[Candidate, list | None, list]]:
        """(candidate, messages, tool images) for every candidate that keeps its place."""
        if not chunk:
            return []
        if self.cfg.trajectories == "none":
            return [(c, None, []) for c in chunk]
        examples = [_example(f"c{i}", c) for i, c in enumerate(chunk)]
        if self.cfg.trajectories == "teacher":
            from data_pipeline.synth.teacher import teacher_trajectories

            results = teacher_trajectories(examples, self.cfg.teacher, self.toolbox, self.cfg.agent)
            kept = []
            for candidate, result in zip(chunk, results):
                if result.messages is None:
                    state.dropped[f"teacher: {result.status}"] += 1
                else:
                    kept.append((candidate, result.messages, result.tool_images))
            return kept
        from mmsearch.agent.loop import AgentLoop
        from mmsearch.engines.scripted import ScriptedEngine

        writer = gold_writer({ex.id: c for ex, c in zip(examples, chunk)}, self.cfg.filters.identify_top_k, self.cfg.gold)
        loop = AgentLoop(ScriptedEngine(None, writer), self.toolbox, None, self.cfg.agent)
        kept = []
        for candidate, example, traj in zip(chunk, examples, loop.run(examples)):
            reason = check_evidence(candidate, traj, self.cfg.filters.identify_top_k)
            if reason:
                state.dropped[f"evidence: {reason}"] += 1
            else:
                kept.append((candidate, traj.messages, traj.images[len(example.images):]))
        return kept

    def _row(self, split: str, index: int, candidate: Candidate, messages, tool_images) -> dict:
        row_id = f"{split}-{index:06d}"
        meta = dict(candidate.meta, category=candidate.category.name)
        if tool_images:
            folder = self.work / "tool_images"
            folder.mkdir(exist_ok=True)
            meta["tool_images"] = []
            for k, image in enumerate(tool_images):
                path = folder / f"{row_id}_{k}.png"
                image.save(path)
                meta["tool_images"].append(str(path.resolve()))
        return {"id": row_id, "split": split, "images": [str(p) for p in candidate.images],
                "question": candidate.question, "answers": candidate.answers, "kind": candidate.kind,
                "hops": candidate.category.hops, "requires_search": candidate.category.requires_search,
                "split_key": candidate.split_key, "messages": messages, "meta": meta}

    def _info(self, state: RunState, split_targets: dict) -> dict:
        cfg = self.cfg
        mix = {}
        for split in SPLITS:
            targets = category_targets(split_targets[split], cfg.mix, cfg.modality)
            mix[split] = {c.name: {"target": k, "kept": state.splits[split].accepted[c.name],
                                   "tried": state.splits[split].tried[c.name]} for c, k in targets.items()}
        return {
            "seed": cfg.seed, "modality": cfg.modality, "hop_count": HOP_COUNT,
            "kb": str(Path(cfg.kb).resolve()), "kb_fingerprint": self.graph.fingerprint,
            "n_requested": cfg.n, "trajectories": cfg.trajectories,
            # what gold crop boxes were written for (SFT checks it); text questions have none
            "vision": None if self.text else asdict(self.vision),
            "config": to_yaml(cfg), "kb_report": self.graph.report.as_dict(), "mix": mix,
            "filters": {k: v for k, v in state.dropped.items() if k.startswith("filter")},
            "dropped": dict(state.dropped), "rewrites": dict(state.rewrites),
            "entities_per_split": {s: len(self.parts[s]) for s in SPLITS},
        }


def _open_categories(targets: dict[Category, int], progress: SplitState, pending: Counter | None = None
                     ) -> dict[Category, float]:
    """Categories still short of target and not given up, with how full each is (kept + pending) / target."""
    pending = pending or Counter()
    return {c: (progress.accepted[c.name] + pending[c.name]) / k for c, k in targets.items()
            if c.name not in progress.exhausted and progress.accepted[c.name] + pending[c.name] < k}


def run_synth(cfg: SynthConfig, toolbox=None, progress: bool = True) -> dict:
    return Synthesizer(cfg, toolbox=toolbox, progress=progress).run()


def _vision(cfg: SynthConfig):
    if not cfg.processor:
        return cfg.tools.vision
    from transformers import AutoProcessor

    from mmsearch.agent.setup import vision_from_processor

    return vision_from_processor(AutoProcessor.from_pretrained(cfg.processor), cfg.tools.vision)


def _example(example_id: str, candidate: Candidate) -> Example:
    images = []
    for path in candidate.images:
        with Image.open(path) as img:
            images.append(img.convert("RGB"))
    return Example(example_id, candidate.question, images, candidate.answers, candidate.kind,
                   candidate.category.hops, candidate.category.requires_search)


def _read_rows(path: Path):
    if path.exists():
        with path.open(encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)


def _key_of(row: dict, hashes: FileHashes) -> str:
    return dedup_key(row["question"], [Path(p) for p in row["images"]], hashes)
