"""Build a KB dir from a WorldConfig: entities, pictures, articles, scenes, in the DESIGN.md format.

The dir is written next to its destination and moved into place at the end, so an interrupted
build never leaves a half-written KB where a finished one is expected.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from data_pipeline.world.articles import article, distractor
from data_pipeline.world.config import WorldConfig
from data_pipeline.world.designs import Design, FlagDesign, assign_designs, image_text, image_title
from data_pipeline.world.graph import KINDS, generate_world
from data_pipeline.world.render import render
from data_pipeline.world.scenes import Picture, Scene, plan_scenes, render_scene

FORMAT = "mmsearch-world/1"
MARKER = "world.json"
# Fast zlib: scenes encode twice as fast as at the default level 6 and are ~15% larger.
PNG_COMPRESS_LEVEL = 1
# Config keys that do not change the output, left out of world.json so equal worlds are equal files.
NOT_RECORDED = ("out", "workers")


def build_world(cfg: WorldConfig, progress: bool = True) -> dict:
    """Write the KB dir at `cfg.out` (replacing a previous world there) and return a summary."""
    start = time.perf_counter()
    _validate(cfg)
    out = Path(cfg.out)
    if out.exists() and not (out / MARKER).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not a world built here; refusing to overwrite it")
    staging = out.with_name(out.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)

    world = generate_world(cfg.seed, cfg.entities, cfg.kinds)
    designs = assign_designs(world, cfg.seed)

    pictures, image_records = [], []
    for entity in world.entities:
        if entity.id in designs:
            design = designs[entity.id]
            image_id, path = f"img_{entity.id}", f"images/{entity.kind}/{entity.id}.png"
            pictures.append((path, Picture(entity.id, image_id, design, _picture_size(design, cfg))))
            image_records.append({"id": image_id, "path": path, "title": image_title(entity),
                                  "text": image_text(design), "entity_id": entity.id})
    scenes = plan_scenes([p for _, p in pictures], round(len(world.entities) * cfg.scenes_per_entity), cfg.seed,
                         (cfg.scene_width, cfg.scene_height), (cfg.scene_objects_min, cfg.scene_objects_max))

    for kind in KINDS:
        (staging / "images" / kind).mkdir(parents=True, exist_ok=True)
    (staging / "scenes").mkdir()
    tasks = [(str(staging / path), picture) for path, picture in pictures]
    tasks += [(str(staging / scene.path), scene) for scene in scenes]
    _render_all(tasks, cfg.workers, progress)

    article_passages = [p for e in world.entities for p in article(world, e, designs.get(e.id), cfg.seed)]
    distractors = [distractor(world, i, cfg.seed) for i in range(round(len(world.entities) * cfg.distractors_per_entity))]
    _write_jsonl(staging / "passages.jsonl", article_passages + distractors)
    _write_jsonl(staging / "images.jsonl", image_records)
    _write_jsonl(staging / "entities.jsonl", [e.record() for e in world.entities])
    _write_jsonl(staging / "scenes.jsonl", [s.record() for s in scenes])

    counts = {
        "entities": len(world.entities),
        "by_kind": {k: len(world.of_kind(k)) for k in KINDS},
        "relations": sum(len(e.relations) for e in world.entities),
        "passages": len(article_passages) + len(distractors),
        "article_passages": len(article_passages),
        "distractor_passages": len(distractors),
        "images": len(image_records),
        "scenes": len(scenes),
        "scene_objects": sum(len(s.objects) for s in scenes),
    }
    config = {k: v for k, v in asdict(cfg).items() if k not in NOT_RECORDED}
    (staging / MARKER).write_text(json.dumps({"format": FORMAT, "config": config, "counts": counts},
                                             indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    staging.rename(out)
    return {"out": str(out), **counts, "seconds": round(time.perf_counter() - start, 2)}


def _validate(cfg: WorldConfig) -> None:
    problems = []
    if not 1 <= cfg.scene_objects_min <= cfg.scene_objects_max <= 9:
        problems.append("need 1 <= scene_objects_min <= scene_objects_max <= 9 (one object per 3x3 cell)")
    if min(cfg.scene_width, cfg.scene_height) < 96:
        problems.append("scene_width and scene_height must be at least 96 pixels")
    if min(cfg.flag_width, cfg.flag_height, cfg.emblem_size) < 8:
        problems.append("picture sizes must be at least 8 pixels")
    if cfg.distractors_per_entity < 0 or cfg.scenes_per_entity < 0:
        problems.append("distractors_per_entity and scenes_per_entity must not be negative")
    if cfg.workers < 1:
        problems.append("workers must be at least 1")
    if problems:
        raise ValueError("bad world config: " + "; ".join(problems))


def _picture_size(design: Design, cfg: WorldConfig) -> tuple[int, int]:
    if isinstance(design, FlagDesign):
        return cfg.flag_width, cfg.flag_height
    return cfg.emblem_size, cfg.emblem_size


def _render_one(task: tuple[str, Picture | Scene]) -> None:
    path, item = task
    image = render_scene(item) if isinstance(item, Scene) else render(item.design, item.size)
    # No metadata is added, so equal pixels give equal bytes.
    image.save(path, format="PNG", compress_level=PNG_COMPRESS_LEVEL)


def _render_all(tasks: list[tuple[str, Picture | Scene]], workers: int, progress: bool) -> None:
    with tqdm(total=len(tasks), desc="rendering", unit="img", disable=not progress) as bar:
        if workers == 1:
            for task in tasks:
                _render_one(task)
                bar.update()
            return
        # spawn, not fork: safe whatever threads the parent runs (torch, tokenizers).
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for _ in pool.imap_unordered(_render_one, tasks, chunksize=max(1, min(64, len(tasks) // (8 * workers)))):
                bar.update()


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
