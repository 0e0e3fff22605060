"""Text modality: the same multi-hop chains, with the first entity named or described in words, not pictured.

A named question names its first entity ("What is the capital of Ibrovova?"), and every hop is a
text search that follows a relation or reads a fact. A described question points at the entity
through one of its facts or relations instead ("the nation whose currency is the trudai"), and
its first search finds the entity from that description.

What keeps each question answerable and inside its split:
- a name is used only when no other entity in the KB has it as a name or alias;
- a description is used only when it is unique in the whole KB: no other entity, of any kind, has
  that value for that fact (compared after answer normalisation) or that relation to that entity,
  so any passage that shows the value names the one entity it fits. A fact value that gives the
  entity's name away ("Ibrovovan" for Ibrovova) is not used;
- a relation's target is described only when it is in the split and its name is unique;
- a fact value that contains the name of an entity outside the split is not used.
The chain then follows the same `follow_path` as the image modality, avoiding the described target.

Hops count text searches, as they count searches in the image modality (where identifying the
pictured entity is the first): a named question has one per relation or fact followed, a
described one has one more for resolving its description.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import dataclass

from data_pipeline.synth import templates as T
from data_pipeline.synth.graph import EntityGraph
from data_pipeline.synth.questions import Candidate, Category, Step, follow_path
from mmsearch.rewards.answer import normalize_answer

TEXT_VIEWS = ("named", "described")
ANCHOR_TRIES = 4  # anchors tried per candidate, of the wanted kind and then of any kind


@dataclass(frozen=True)
class Description:
    """How a described question points at its first entity: `relation` (a fact or a relation) with `value`
    (the fact's value, or the name of `target`, the related entity)."""

    relation: str
    value: str
    target: str  # "" for a fact
    fact: bool


class KBNames:
    """The KB's names and descriptions, counted once over every entity, for the uniqueness checks."""

    def __init__(self, graph: EntityGraph):
        self.graph = graph
        self.by_name: dict[str, set[str]] = defaultdict(set)  # normalised name or alias -> entity ids
        self.facts: Counter = Counter()  # (fact, normalised value) -> entities that have it
        self.relations: Counter = Counter()  # (relation, target id) -> entities that have it
        for entity in graph.entities.values():
            for name in entity.answers:
                if normalize_answer(name):
                    self.by_name[normalize_answer(name)].add(entity.id)
            for fact, value in entity.facts.items():
                self.facts[fact, normalize_answer(value)] += 1
            for relation, target in entity.relations.items():
                self.relations[relation, target] += 1
        self._longest = max((len(name.split()) for name in self.by_name), default=0)

    def unique_name(self, entity_id: str) -> bool:
        """Whether the entity's name names it alone (no other entity has it as a name or alias)."""
        return self.by_name.get(normalize_answer(self.graph.entities[entity_id].name)) == {entity_id}

    def named_in(self, text: str) -> set[str]:
        """Entities whose name or an alias occurs in `text` as whole words (after answer normalisation)."""
        tokens, found = normalize_answer(text).split(), set()
        for start in range(len(tokens)):
            for end in range(start + 1, min(len(tokens), start + self._longest) + 1):
                found |= self.by_name.get(" ".join(tokens[start:end]), set())
        return found

    def descriptions(self, entity_id: str, split_entities: set[str]) -> list[Description]:
        """The entity's descriptions that are unique in the KB and name nothing outside the split, in a fixed order."""
        entity = self.graph.entities[entity_id]
        own = [normalize_answer(name) for name in entity.answers]
        out = []
        for fact, value in sorted(entity.facts.items()):
            norm = normalize_answer(value)
            if not norm or self.facts[fact, norm] != 1 or any(name and name in norm for name in own):
                continue
            if not self.named_in(value) <= split_entities - {entity_id}:
                continue
            out.append(Description(fact, value, "", True))
        for relation, target in sorted(entity.relations.items()):
            if target in split_entities and self.relations[relation, target] == 1 and self.unique_name(target):
                out.append(Description(relation, self.graph.entities[target].name, target, False))
        return out


class TextQuestions:
    """Text-modality candidates over one split's entities whose kind is one of `kinds` (None: any)."""

    def __init__(self, graph: EntityGraph, names: KBNames, split_entities: set[str], kinds: set[str] | None = None):
        self.graph, self.names, self.split_entities = graph, names, split_entities
        self.anchors = sorted(e for e in split_entities if kinds is None or graph.entities[e].kind in kinds)
        self.by_kind: dict[str, list[str]] = defaultdict(list)
        for entity_id in self.anchors:
            self.by_kind[graph.entities[entity_id].kind].append(entity_id)

    def candidate(self, category: Category, kind: str | None, facts_share: float, rng: random.Random
                  ) -> Candidate | None:
        """A candidate of `category` (named or described, 1-3 hops), or None.

        A few anchors of `kind` are tried first, then a few of any kind: a named question follows one
        relation more than the image modality's question of the same hops, so some kinds have no
        3-hop chain at all (a nation's capital is in the nation), and the kind balance must not keep
        asking them for one."""
        if category.view not in TEXT_VIEWS:
            raise ValueError(f"text modality questions are {' or '.join(TEXT_VIEWS)}, got view {category.view!r}")
        for pool in (self.by_kind.get(kind or "", []), self.anchors):
            for anchor_id in rng.sample(pool, min(len(pool), ANCHOR_TRIES)):
                candidate = self._candidate(category, anchor_id, facts_share, rng)
                if candidate is not None:
                    return candidate
        return None

    def _candidate(self, category: Category, anchor_id: str, facts_share: float, rng: random.Random
                   ) -> Candidate | None:
        graph, anchor = self.graph, self.graph.entities[anchor_id]
        steps: list[Step] = []
        description, described = None, []  # the description and the entity it names, if any
        if category.view == "described":
            options = self.names.descriptions(anchor_id, self.split_entities)
            if not options:
                return None
            description = rng.choice(options)
            described = [description.target] if description.target else []
            subject = graph.entities[description.target].answers if description.target else [description.value]
            steps.append(Step("text_search", {"query": T.describe_query(description.relation, description.value)},
                              subject, anchor.answers, description.relation, fact=description.fact, describes=True))
            np_ = described_np = T.describe_np(anchor.kind, description.relation, description.value, description.fact)
            follows = category.hops - 1
        else:
            if not self.names.unique_name(anchor_id):
                return None
            np_, follows = anchor.name, category.hops
        path = follow_path(graph, anchor_id, follows, self.split_entities, facts_share, rng, frozenset(described))
        if path is None:
            return None

        current = anchor
        for relation, target in path:
            if target:
                query, evidence = T.relation_query(rng, relation, current.name), graph.entities[target].answers
            else:
                query, evidence = T.fact_query(rng, relation, current.name), [current.facts[relation]]
            steps.append(Step("text_search", {"query": query}, current.answers, evidence, relation, fact=not target))
            if target:
                np_, current = T.relation_np(rng, relation, np_), graph.entities[target]

        if path and path[-1][1] == "":
            question, answers = T.fact_question(rng, path[-1][0], np_), [current.facts[path[-1][0]]]
        else:  # ends on an entity: the last one followed, or (1 hop, described) the described one itself
            question, answers = T.entity_question(rng, current.kind, np_), current.answers
        meta = {"view": category.view, "anchor": anchor_id,
                "path": [{"relation": r, "entity": t or None} for r, t in path],
                "entities": [anchor_id, *described, *(t for _, t in path if t)],
                "keep": [description.value if description else anchor.name]}
        if description is not None:
            meta["description"] = {"relation": description.relation, "value": description.value,
                                   "entity": description.target or None, "fact": description.fact,
                                   "np": described_np}
        return Candidate(question, answers, category, anchor.kind, [], anchor_id, steps, meta)
