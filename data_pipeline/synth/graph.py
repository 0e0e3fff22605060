"""The KB's entity graph as synthesis reads it, with every bad record reported and skipped.

Needs `entities.jsonl` (id, name, aliases, kind, facts, relations) and `images.jsonl`; nothing
here is specific to the generated world. A relation whose target is not an entity, a fact that is
not a scalar, or an entity without a name is skipped with a reason in `report`, never silently.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from tools.kb import ENTITIES_FILE, KB, KBError


@dataclass(frozen=True)
class Entity:
    id: str
    name: str
    kind: str
    aliases: tuple[str, ...]
    facts: dict[str, str]
    relations: dict[str, str]  # relation -> target entity id (single-valued relations only)

    @property
    def answers(self) -> list[str]:
        return [self.name, *(a for a in self.aliases if a != self.name)]


@dataclass(frozen=True)
class EntityImage:
    id: str
    path: Path  # absolute
    title: str


@dataclass
class GraphReport:
    """Counts of what was skipped while reading the KB, by reason (shown in the dataset card)."""

    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 3:
            self.examples[reason].append(where)

    def as_dict(self) -> dict:
        return {reason: {"count": n, "examples": self.examples[reason]} for reason, n in sorted(self.skipped.items())}


class EntityGraph:
    def __init__(self, entities: dict[str, Entity], images: dict[str, list[EntityImage]], report: GraphReport,
                 fingerprint: str):
        self.entities, self.images, self.report, self.fingerprint = entities, images, report, fingerprint
        self._bad_images: set[Path] = set()
        self._checked: set[Path] = set()
        neighbours: dict[str, set[str]] = defaultdict(set)
        for entity in entities.values():
            for target in entity.relations.values():
                neighbours[entity.id].add(target)
                neighbours[target].add(entity.id)
        self.neighbours = {k: sorted(v) for k, v in neighbours.items()}

    @classmethod
    def load(cls, kb_dir: str | Path) -> EntityGraph:
        kb = KB(kb_dir)
        if not kb.has(ENTITIES_FILE):
            raise KBError(f"{kb.root} has no {ENTITIES_FILE}: synthesis follows the entity graph "
                          "(id, name, aliases, kind, facts, relations per line)")
        report = GraphReport()
        raw: dict[str, dict] = {}
        for record in kb.entities():
            problem = _entity_problem(record)
            if problem:
                report.skip(f"entity: {problem}", str(record.get("id", "?")))
            elif record["id"] in raw:
                report.skip("entity: duplicate id", record["id"])
            else:
                raw[record["id"]] = record
        for name, skips in kb.skips.items():
            if skips.skipped:
                report.skipped[f"{name}: unreadable line"] += skips.skipped
                report.examples[f"{name}: unreadable line"] = skips.reasons[:3]
        entities = {eid: _entity(rec, raw, report) for eid, rec in raw.items()}
        images: dict[str, list[EntityImage]] = defaultdict(list)
        for image in kb.images(check_files=True):
            if image.entity_id is None:
                continue  # distractor images: searchable, never asked about
            if image.entity_id not in entities:
                report.skip("image: entity_id not in entities.jsonl", image.id)
                continue
            images[image.entity_id].append(EntityImage(image.id, (kb.root / image.path).resolve(), image.title))
        skips = kb.skips.get("images.jsonl")
        if skips is not None and skips.skipped:
            report.skipped["images.jsonl: bad record"] += skips.skipped
            report.examples["images.jsonl: bad record"] = skips.reasons[:3]
        if not entities:
            raise KBError(f"no usable entities in {kb.root / ENTITIES_FILE} ({report.as_dict()})")
        return cls(entities, dict(images), report, kb.fingerprint())

    def pictured(self, ids: list[str] | set[str] | None = None) -> list[str]:
        """Entities with at least one image, in id order (optionally only among `ids`)."""
        pool = self.images if ids is None else [i for i in ids if i in self.images]
        return sorted(pool)

    def image_ok(self, path: Path) -> bool:
        """Whether an image file decodes; a corrupt one is reported once and never used."""
        if path in self._checked:
            return path not in self._bad_images
        self._checked.add(path)
        try:
            with Image.open(path) as img:
                img.verify()
        except Exception as exc:  # noqa: BLE001 - any decoder failure means the file is unusable
            self._bad_images.add(path)
            self.report.skip("image: corrupt file", f"{path.name} ({type(exc).__name__})")
            return False
        return True


def _entity_problem(record: dict) -> str | None:
    for key in ("id", "name", "kind"):
        if not isinstance(record.get(key), str) or not record[key].strip():
            return f"missing or empty '{key}'"
    if not isinstance(record.get("aliases", []), list):
        return "'aliases' is not a list"
    for key in ("facts", "relations"):
        if not isinstance(record.get(key, {}), dict):
            return f"'{key}' is not an object"
    return None


def _entity(record: dict, raw: dict[str, dict], report: GraphReport) -> Entity:
    relations = {}
    for relation, target in record.get("relations", {}).items():
        if isinstance(target, list) and len(target) == 1:
            target = target[0]
        if not isinstance(target, str):
            report.skip("relation: not a single entity id", f"{record['id']}.{relation}")
        elif target not in raw:
            report.skip("relation: target not in entities.jsonl", f"{record['id']}.{relation} -> {target}")
        else:
            relations[relation] = target
    facts = {}
    for fact, value in record.get("facts", {}).items():
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and str(value).strip():
            facts[fact] = str(value)
        else:
            report.skip("fact: not a scalar", f"{record['id']}.{fact}")
    aliases = tuple(a for a in record.get("aliases", []) if isinstance(a, str) and a.strip())
    return Entity(record["id"], record["name"], record["kind"], aliases, facts, relations)
