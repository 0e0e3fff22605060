"""`mmsearch kb check`: what `index build` and `synth` would make of a KB dir, before either runs.

It reads the KB through the readers those jobs use (`tools.kb.KB` for passages and images, `EntityGraph` for the
entity graph), so the skip reasons it prints are theirs, counted, with a few examples each. It also reports what
they keep but a user may not expect (duplicate ids are indexed twice; an image without a title shows up in image
search with no name), the entity kinds and relation types, and how many question paths of each hop count the graph
offers. Images are checked with PIL's `verify` (structure and checksums, no full decode): cheap next to encoding.

Hops are synth's: hop 1 is the image search that identifies a pictured entity, and each further hop follows one
relation to another entity or ends by reading a fact. Synth splits the entities by region first and keeps each
path inside one split, so the counts are an upper bound on what it can ask.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from PIL import Image

from data_pipeline.kb_import import SeenIds
from data_pipeline.synth.graph import EntityGraph
from tools.kb import ENTITIES_FILE, IMAGES_FILE, KB, PASSAGES_FILE, KBError

EXAMPLES = 3


class _Notes:
    """Counts per reason with the first few examples, in the {reason: {count, examples}} shape of the report."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, reason: str, example: str) -> None:
        self.counts[reason] += 1
        if len(self.examples.setdefault(reason, [])) < EXAMPLES:
            self.examples[reason].append(example)

    def as_dict(self) -> dict:
        return {r: {"count": n, "examples": self.examples[r]} for r, n in self.counts.most_common()}


def check_kb(kb_dir: str | Path) -> dict:
    """The report `mmsearch kb check` prints; `buildable` is False when no index could be built from the KB."""
    kb = KB(kb_dir)  # KBError when it has neither passages.jsonl nor images.jsonl
    passages = _passages(kb)
    images, readable = _images(kb)
    report = {"kb": str(kb.root), "passages": passages, "images": images, "entities": _entities(kb, readable)}
    report["buildable"] = passages["usable"] > 0 or images["usable"] > 0
    return report


def _passages(kb: KB) -> dict:
    if not kb.has(PASSAGES_FILE):
        return {"present": False, "usable": 0, "skipped": {}, "kept_but": {}}
    usable, ids, kept_but = 0, SeenIds(), _Notes()
    for p in kb.passages():
        usable += 1
        if not ids.add(p.id):
            kept_but.add("duplicate id (indexed twice)", p.id)
    return {"present": True, "usable": usable, "skipped": kb.skips[PASSAGES_FILE].as_dict(),
            "kept_but": kept_but.as_dict()}


def _images(kb: KB) -> tuple[dict, set[Path]]:
    """The images section, and the resolved paths of the images that read (synth may picture only those)."""
    if not kb.has(IMAGES_FILE):
        return {"present": False, "usable": 0, "skipped": {}, "kept_but": {}}, set()
    usable, ids, corrupt, kept_but, readable = 0, SeenIds(), _Notes(), _Notes(), set()
    for record in kb.images(check_files=True):
        path = kb.image_path(record).resolve()
        try:
            with Image.open(path) as img:
                img.verify()
        except Exception as exc:  # noqa: BLE001 - any decoder failure: index build skips the image
            corrupt.add("unreadable image file", f"{record.id}: {record.path} ({type(exc).__name__})")
            continue
        usable += 1
        readable.add(path)
        if not ids.add(record.id):
            kept_but.add("duplicate id (indexed twice)", record.id)
        if not record.title.strip():
            kept_but.add("no title (image search shows no name for it)", record.id)
    skipped = {**kb.skips[IMAGES_FILE].as_dict(), **corrupt.as_dict()}
    return {"present": True, "usable": usable, "skipped": skipped, "kept_but": kept_but.as_dict()}, readable


def _entities(kb: KB, readable_images: set[Path]) -> dict:
    if not kb.has(ENTITIES_FILE):
        return {"present": False, "note": f"no {ENTITIES_FILE}: `mmsearch synth` cannot run (index build does not "
                                          "need it)"}
    try:
        graph = EntityGraph.load(kb.root)
    except KBError as exc:
        return {"present": True, "usable": 0, "note": str(exc)}
    entities = graph.entities
    pictured = {e for e, imgs in graph.images.items() if any(i.path in readable_images for i in imgs)}
    kinds = Counter(e.kind for e in entities.values())
    kinds_pictured = Counter(entities[e].kind for e in pictured)
    relation_types = Counter(r for e in entities.values() for r in e.relations)
    kept_but = _Notes()
    for entity in sorted(entities.values(), key=lambda e: e.id):
        if not entity.relations:
            kept_but.add("no relations (questions about it stop at 1 hop or a fact)", entity.id)
        if entity.id not in pictured:
            kept_but.add("no readable image (reached only through a relation)", entity.id)
    return {
        "present": True,
        "usable": len(entities),
        "skipped": graph.report.as_dict(),
        "kept_but": kept_but.as_dict(),
        "kinds": {k: {"entities": n, "pictured": kinds_pictured[k]} for k, n in sorted(kinds.items())},
        "relation_types": dict(sorted(relation_types.items())),
        "facts": sum(len(e.facts) for e in entities.values()),
        "question_paths": question_paths(graph, pictured),
    }


def question_paths(graph: EntityGraph, pictured: set[str]) -> dict[str, dict[str, int]]:
    """Paths synth can ask about, by hops: from a pictured entity, through relations that visit no entity twice,
    optionally ending on a fact (synth's `_path`). Hops stop at 3, as synth's do."""
    entities = graph.entities
    # hop 1 asks for the pictured entity itself: one path per pictured entity, ending on it
    paths = {"1": {"relation": len(pictured), "fact": 0}, "2": {"relation": 0, "fact": 0},
             "3": {"relation": 0, "fact": 0}}
    for anchor in pictured:
        paths["2"]["fact"] += len(entities[anchor].facts)
        for first in entities[anchor].relations.values():
            if first == anchor:
                continue
            paths["2"]["relation"] += 1
            paths["3"]["fact"] += len(entities[first].facts)
            paths["3"]["relation"] += sum(t not in (anchor, first) for t in entities[first].relations.values())
    return {h: {"total": c["relation"] + c["fact"], "end_on_entity": c["relation"], "end_on_fact": c["fact"]}
            for h, c in paths.items()}


# -- the table `mmsearch kb check` prints ------------------------------------------------------------


def format_report(report: dict) -> str:
    lines = [f"KB {report['kb']}", ""]
    for name, section in (("passages", report["passages"]), ("images", report["images"])):
        if not section["present"]:
            lines.append(f"{name}: no {PASSAGES_FILE if name == 'passages' else IMAGES_FILE}")
            continue
        skipped = sum(s["count"] for s in section["skipped"].values())
        lines.append(f"{name}: {section['usable']} usable, {skipped} skipped by index build")
        lines += _reasons("skipped", section["skipped"]) + _reasons("kept, but", section["kept_but"]) + [""]
    ent = report["entities"]
    if not ent["present"] or "kinds" not in ent:
        lines.append(f"entities: {ent['note']}")
    else:
        skipped = sum(s["count"] for s in ent["skipped"].values())
        lines.append(f"entities: {ent['usable']} usable, {skipped} records or fields skipped by synth, "
                     f"{ent['facts']} facts")
        lines += _reasons("skipped", ent["skipped"]) + _reasons("kept, but", ent["kept_but"])
        lines += ["", *_table(["kind", "entities", "pictured"],
                              [[k, v["entities"], v["pictured"]] for k, v in ent["kinds"].items()])]
        lines += ["", *_table(["relation", "links"], [[r, n] for r, n in ent["relation_types"].items()] or [["-", 0]])]
        lines += ["", *_table(["hops", "question paths", "end on an entity", "end on a fact"],
                              [[h, p["total"], p["end_on_entity"], p["end_on_fact"]]
                               for h, p in ent["question_paths"].items()])]
        lines += ["(hop 1: image search names a pictured entity; each further hop follows a relation or reads a",
                  "fact. Upper bounds: synth keeps each path inside one entity split.)"]
    lines.append("")
    if report["buildable"]:
        lines.append("ok: indexes can be built from this KB")
    else:
        lines.append("error: nothing can be built from this KB: no usable passages and no usable images")
    return "\n".join(lines)


def _reasons(label: str, notes: dict) -> list[str]:
    out = []
    for reason, note in notes.items():
        out.append(f"  {label:9s} {note['count']:>7d}  {reason}")
        out += [f"{'':21s}e.g. {example}" for example in note["examples"]]
    return out


def _table(headers: list[str], rows: list[list]) -> list[str]:
    cells = [headers, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def fmt(row: list[str]) -> str:  # first column left-aligned (names), the rest right-aligned (numbers)
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return [fmt(cells[0]), fmt(["-" * w for w in widths]), *(fmt(r) for r in cells[1:])]
