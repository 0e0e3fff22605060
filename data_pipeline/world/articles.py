"""Encyclopedia text: one article per entity, split into passages, and distractor passages.

An article states every fact and relation of its entity, each in a sentence drawn from several
templates, so retrieval has to match meaning rather than one fixed phrasing. Distractors name
related entities together without saying how they are related, so a passage that merely contains
both names is not evidence.
"""

from __future__ import annotations

import random

from data_pipeline.world.designs import Design, describe
from data_pipeline.world.grammar import capitalise, fix_articles, join_and
from data_pipeline.world.graph import Entity, World, mention
from data_pipeline.world.seeding import derive_rng

# {s}: the entity, {o}: the relation's target, {v}: a fact's value, {y}: a year fact that the
# sentence may repeat. Every template names both ends so each sentence stands alone.
RELATION_TEMPLATES = {
    "capital": ("The capital of {s} is {o}.", "{o} serves as the capital of {s}.",
                "{s} is governed from its capital, {o}.", "The seat of government of {s} is the city of {o}."),
    "country": ("{s} is a city in {o}.", "{s} lies within the borders of {o}.",
                "The city of {s} belongs to {o}.", "{s} is located in the nation of {o}."),
    "flows_through": ("{s} flows through {o}.", "Most of the course of {s} lies in {o}.",
                      "{s} runs across the territory of {o}.", "{s} crosses {o} on its way to the sea."),
    "birthplace": ("{s} was born in {o}.", "{s} was born in the city of {o}.", "The birthplace of {s} is {o}.",
                   "{o} is where {s} was born."),
    "founder": ("{s} was founded by {o}.", "{o} founded {s} in {y}.", "The founder of {s} was {o}.",
                "{s} was established by {o}."),
    "headquarters": ("{s} is headquartered in {o}.", "The headquarters of {s} are in {o}.",
                     "{s} has its main offices in {o}.", "{s} is based in the city of {o}."),
    "creator": ("{s} was painted by {o}.", "{o} painted {s} in {y}.", "{s} is a work by the painter {o}.",
                "The artist who created {s} was {o}."),
    "housed_in": ("{s} is held in the collection of {o}.", "{s} hangs in {o}.", "Today {s} is kept by {o}.",
                  "Visitors can see {s} at {o}."),
}
FACT_TEMPLATES = {
    "government": ("{s} is a {v}.", "The form of government of {s} is a {v}."),
    "founded": ("{s} was founded in {v}.", "The founding of {s} dates to {v}.", "{s} dates from {v}."),
    "currency": ("The currency of {s} is the {v}.", "People in {s} pay with the {v}.",
                 "{s} uses the {v} as its currency."),
    "official_language": ("The official language of {s} is {v}.", "{v} is the official language of {s}."),
    "population": ("{s} has a population of about {v}.", "About {v} people live in {s}.",
                   "The population of {s} is roughly {v}."),
    "elevation": ("{s} lies at an elevation of {v}.", "The elevation of {s} is {v} above sea level."),
    "length": ("{s} is {v} long.", "The length of {s} is {v}."),
    "discharge": ("The average discharge of {s} is {v}.", "{s} carries about {v} of water on average."),
    "mouth": ("{s} empties into {v}.", "The mouth of {s} is on {v}."),
    "born": ("{s} was born in {v}.", "The year of birth of {s} is {v}."),
    "died": ("{s} died in {v}.", "{s} lived until {v}."),
    "occupation": ("{s} was a {v}.", "{s} worked as a {v}.", "By profession, {s} was a {v}."),
    "type": ("{s} is a {v}.", "{s} operates as a {v}."),
    "employees": ("{s} employs about {v} people.", "The staff of {s} numbers around {v}."),
    "year": ("{s} was completed in {v}.", "{s} dates from {v}."),
    "medium": ("{s} is painted in {v}.", "The medium of {s} is {v}."),
    "dimensions": ("{s} measures {v}.", "The dimensions of {s} are {v}."),
}
# The year a relation sentence may mention, so it always agrees with the facts.
RELATION_YEAR = {"founder": "founded", "creator": "year"}
# Which passage of the article each statement goes to; unlisted ones go to the introduction.
# "of:<relation>" keys are the sentences about what points at the entity (a nation's cities).
SECTIONS = {
    "nation": {"capital": "Government", "official_language": "Government", "currency": "Economy",
               "population": "Demographics", "founded": "History", "of:country": "Geography",
               "of:flows_through": "Geography"},
    "city": {"founded": "History", "population": "Demographics", "elevation": "Geography",
             "of:birthplace": "People and institutions", "of:headquarters": "People and institutions"},
    "river": {"flows_through": "Course", "mouth": "Course", "length": "Hydrology", "discharge": "Hydrology"},
    "person": {"birthplace": "Life", "of:founder": "Works", "of:creator": "Works"},
    "organisation": {"founder": "History", "founded": "History", "headquarters": "Organisation",
                     "employees": "Organisation", "of:housed_in": "Collection"},
    "artwork": {"creator": "History", "year": "History", "medium": "Description", "dimensions": "Description"},
}
INCOMING_TEMPLATES = {
    "capital": "{s} is the capital of {names}.", "country": "Cities of {s} include {names}.",
    "flows_through": "Rivers of {s} include {names}.", "birthplace": "People born in {s} include {names}.",
    "headquarters": "Organisations based in {s} include {names}.", "founder": "{s} founded {names}.",
    "creator": "Paintings by {s} include {names}.", "housed_in": "The collection of {s} includes {names}.",
}
PICTURE_SECTION = {"nation": "Flag", "city": "Seal", "organisation": "Emblem", "person": "Portrait",
                   "artwork": "Description"}
PICTURE_TEMPLATES = {
    "nation": "The flag of {s} has {d}.", "city": "The seal of {s} shows {d}.",
    "organisation": "The emblem of {s} is {d}.", "person": "A well-known portrait of {s} shows {d}.",
    "artwork": "{s} shows {d}.",
}
# The article's first sentence, and the facts it states (not repeated later).
LEADS = {
    "nation": ("{s} is a {government}.", ("government",)),
    "city": ("{s} is a city.", ()),
    "river": ("{s} is a river.", ()),
    "person": ("{s} ({born}-{died}) was a {occupation}.", ("born", "died", "occupation")),
    "organisation": ("{s} is a {type}.", ("type",)),
    "artwork": ("{s} is a painting.", ()),
}
# Neutral colour; never states a fact or relation.
FILLERS = {
    "nation": ("Its landscape alternates between high plateaus and broad valleys.",
               "Spring festivals mark the end of the rainy season across the country.",
               "Its postal service issues stamps with regional motifs."),
    "city": ("Its old quarter is known for narrow streets and covered markets.",
             "A weekly market fills the main square.", "Trams have run through its centre for decades."),
    "river": ("Its banks are lined with reeds and willow trees.", "Several ferries cross it each day.",
              "Its water level rises sharply after the spring thaw."),
    "person": ("Letters from this period survive in several archives.",
               "Contemporaries described a patient and methodical character.",
               "A number of biographies have been written since."),
    "organisation": ("Its annual report is published each spring.", "It has changed its statutes several times.",
                     "Its archives are open to researchers by appointment."),
    "artwork": ("It has been restored twice.", "Critics have praised its bold use of colour.",
                "It was lent to several exhibitions abroad."),
}
DISTRACTOR_PAIRS = (
    "A {year} almanac lists {a} alongside {b}.",
    "{a} and {b} both appear in a {year} survey of regional archives.",
    "Collectors in the {decade}s traded postcards depicting {a} and {b}.",
    "A travel writer's notebook from {year} mentions {a} in the same paragraph as {b}.",
    "Exhibition catalogues from {year} reproduce images associated with {a} and {b}.",
    "A school textbook printed in {year} discusses {a} in one chapter and {b} in the next.",
    "Several anniversaries connected to {a} and {b} were celebrated in {year}.",
)
DISTRACTOR_TRIPLES = (
    "A radio programme in {year} talked about {a}, {b} and {c}.",
    "Debates in {year} about {a} occasionally touched on {b} and on {c}.",
    "A {year} quiz book asks questions about {a}, {b} and {c}.",
)
DISTRACTOR_TITLES = ("Almanac entry ({year})", "Regional survey, {year}", "Archive notes ({year})",
                     "Travel notebook ({year})", "Miscellany ({year})", "Press cuttings, {year}")
MAX_LISTED = 3


def _incoming(world: World, entity: Entity, rng: random.Random) -> dict[str, str]:
    """Sentences about what points at the entity (a nation's cities, a painter's works), by relation."""
    groups: dict[str, list[Entity]] = {}
    for relation, source in world.incoming.get(entity.id, []):
        groups.setdefault(relation, []).append(world.by_id[source])
    return {relation: INCOMING_TEMPLATES[relation].format(
                s=mention(entity), names=join_and([mention(e) for e in rng.sample(sources, min(MAX_LISTED, len(sources)))]))
            for relation, sources in groups.items()}


def article(world: World, entity: Entity, design: Design | None, seed: int) -> list[dict]:
    """The entity's passages: an introduction, then one passage per section."""
    rng = derive_rng(seed, "article", entity.id)
    s = mention(entity)
    lead, stated = LEADS[entity.kind]
    intro = [lead.format(s=capitalise(s), **entity.facts)]
    if entity.aliases and entity.kind != "person":
        intro.append(f"It is also known as {join_and(entity.aliases)}.")
    sections: dict[str, list[str]] = {"": list(intro)}
    routes = SECTIONS[entity.kind]

    def add(key: str, sentence: str) -> None:
        sections.setdefault(routes.get(key, ""), []).append(capitalise(sentence))

    for name, value in entity.facts.items():
        if name not in stated:
            add(name, rng.choice(FACT_TEMPLATES[name]).format(s=s, v=value))
    for relation, target in entity.relations.items():
        year = entity.facts.get(RELATION_YEAR.get(relation, ""), "")
        templates = [t for t in RELATION_TEMPLATES[relation] if year or "{y}" not in t]
        add(relation, rng.choice(templates).format(s=s, o=mention(world.by_id[target]), y=year))
    for relation, sentence in _incoming(world, entity, rng).items():
        add(f"of:{relation}", sentence)
    if design is not None:
        sections.setdefault(PICTURE_SECTION[entity.kind], []).append(
            capitalise(PICTURE_TEMPLATES[entity.kind].format(s=s, d=describe(design))))

    fillers = rng.sample(FILLERS[entity.kind], len(FILLERS[entity.kind]))
    passages = []
    for k, (section, sentences) in enumerate(sections.items()):
        # The introduction keeps its lead first; otherwise the order of sentences varies.
        fixed = intro if not section else []
        rest = sentences[len(fixed):]
        body = fixed + rng.sample(rest, len(rest))
        if fillers and rng.random() < 0.4:
            body.append(fillers.pop())
        passages.append({"id": f"{entity.id}_p{k}", "title": f"{entity.name}: {section}" if section else entity.name,
                         "text": fix_articles(" ".join(body)), "entity_id": entity.id})
    return passages


def distractor(world: World, index: int, seed: int) -> dict:
    """A passage naming an entity next to one it is related to (and maybe a third), stating nothing."""
    rng = derive_rng(seed, "distractor", index)
    anchor = rng.choice(world.entities)
    neighbours = list(anchor.relations.values()) + [source for _, source in world.incoming.get(anchor.id, [])]
    partner = world.by_id[rng.choice(neighbours)]
    a, b = (anchor, partner) if rng.random() < 0.5 else (partner, anchor)
    third = rng.choice(world.entities)
    templates = DISTRACTOR_PAIRS if third in (a, b) or rng.random() < 0.6 else DISTRACTOR_TRIPLES
    year = rng.randint(1850, 2015)
    text = rng.choice(templates).format(a=mention(a), b=mention(b), c=mention(third), year=year,
                                        decade=year // 10 * 10)
    return {"id": f"distractor_{index:06d}", "title": rng.choice(DISTRACTOR_TITLES).format(year=year),
            "text": capitalise(text)}
