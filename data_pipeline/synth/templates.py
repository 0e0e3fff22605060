"""Question wording: how to point at a pictured entity, follow a relation, and ask for a fact.

Each phrase has several variants; a question draws one per slot from its own random stream. The
world's kinds, relations and facts have hand-written phrases; anything else a user's KB has gets a
generic phrase built from its name ("the home port of X" for a relation `home_port`), so synthesis
works on any entity graph.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

# kind -> what its picture is called ("" for kinds the world does not picture)
PICTURE_NOUN = {"nation": "flag", "city": "seal", "organisation": "emblem", "person": "portrait", "artwork": "painting"}
KIND_NOUN = {"organisation": "organisation", "artwork": "painting", "nation": "nation", "city": "city", "person": "person"}

# relation -> noun phrases for "the <relation> of {x}"; {x} is the subject's noun phrase
RELATION_NP = {
    "capital": ("the capital of {x}", "the capital city of {x}"),
    "country": ("the nation that {x} is in", "the country where {x} lies"),
    "flows_through": ("the nation that {x} flows through", "the country {x} runs through"),
    "birthplace": ("the birthplace of {x}", "the city where {x} was born"),
    "founder": ("the founder of {x}", "the person who founded {x}"),
    "headquarters": ("the city where {x} is headquartered", "the headquarters city of {x}"),
    "creator": ("the painter of {x}", "the artist who painted {x}"),
    "housed_in": ("the collection that holds {x}", "the museum where {x} hangs"),
}
# relation -> text-search queries a searcher would type; {x} is the subject's name
RELATION_QUERY = {
    "capital": ("capital of {x}", "{x} capital"),
    "country": ("{x} city country", "which nation is {x} in"),
    "flows_through": ("{x} flows through", "{x} course nation"),
    "birthplace": ("{x} born", "birthplace of {x}"),
    "founder": ("founder of {x}", "{x} founded by"),
    "headquarters": ("{x} headquarters", "{x} headquartered in"),
    "creator": ("{x} painted by", "who painted {x}"),
    "housed_in": ("{x} collection", "where is {x} held"),
}
# fact -> (question templates with {x} the subject's noun phrase; search queries with {x} the name)
FACT_TEMPLATES = {
    "founded": (("In what year was {x} founded?", "When was {x} founded?"), ("{x} founded", "founding of {x}")),
    "population": (("What is the population of {x}?", "About how many people live in {x}?"),
                   ("population of {x}", "{x} population")),
    "currency": (("What is the currency of {x}?", "Which currency is used in {x}?"), ("currency of {x}", "{x} currency")),
    "official_language": (("What is the official language of {x}?",), ("official language of {x}",)),
    "government": (("What form of government does {x} have?",), ("{x} form of government",)),
    "elevation": (("At what elevation does {x} lie?", "What is the elevation of {x}?"), ("elevation of {x}",)),
    "born": (("In what year was {x} born?", "When was {x} born?"), ("{x} born year", "year of birth of {x}")),
    "died": (("In what year did {x} die?",), ("{x} died",)),
    "occupation": (("What was the occupation of {x}?", "What did {x} work as?"), ("{x} occupation",)),
    "type": (("What kind of institution is {x}?",), ("{x} type of organisation",)),
    "employees": (("About how many people does {x} employ?",), ("{x} employees staff",)),
    "year": (("In what year was {x} completed?",), ("{x} completed year",)),
    "medium": (("What medium is {x} painted in?",), ("medium of {x}",)),
    "length": (("How long is {x}?",), ("length of {x}",)),
    "mouth": (("Into which sea does {x} empty?",), ("mouth of {x}",)),
}
# Final questions about an entity noun phrase: "Which city is the capital of ...?"
ENTITY_QUESTIONS = ("What is {np}?", "Which {kind} is {np}?", "Name {np}.")
PERSON_QUESTIONS = ("Who is {np}?", "Name {np}.")

POSITION_WORDS = {
    "top-left": ("top-left", "top left", "upper left"), "top": ("top", "top centre", "top center"),
    "top-right": ("top-right", "top right", "upper right"), "left": ("left", "middle left", "centre left"),
    "center": ("center", "centre", "middle"), "right": ("right", "middle right", "centre right"),
    "bottom-left": ("bottom-left", "bottom left", "lower left"), "bottom": ("bottom", "bottom centre", "bottom center"),
    "bottom-right": ("bottom-right", "bottom right", "lower right"),
}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Search-free questions about a scene; {desc} is an object's description ("the flag"), {where} its position phrase.
COUNT_QUESTIONS = ("How many pictures are in the image?", "How many pictures does this image show?",
                   "Count the pictures in the image. How many are there?")
POSITION_QUESTIONS = ("Where in the image is {desc}?", "In which part of the image is {desc}?")
PICTURE_QUESTIONS = ("What kind of picture is {where} of the image?", "What is shown {where} of the image?")
COLOUR_QUESTION = "What is the main colour of {desc} {where}?"


# Text modality: how a question describes its first entity by one of its facts or relations instead of
# naming it ("the nation whose currency is the trudai"); {noun} is the kind's noun, {v} the fact's
# value or the related entity's name. Only descriptions unique in the KB are used (text_questions.py).
DESCRIBE_FACT_NP = {
    "founded": "the {noun} founded in {v}", "population": "the {noun} with a population of {v}",
    "currency": "the {noun} whose currency is the {v}",
    "official_language": "the {noun} whose official language is {v}",
    "government": "the {noun} that is a {v}", "elevation": "the {noun} at an elevation of {v}",
    "born": "the {noun} born in {v}", "died": "the {noun} who died in {v}",
    "occupation": "the {noun} who worked as a {v}", "employees": "the {noun} with {v} employees",
    "year": "the {noun} completed in {v}", "medium": "the {noun} in {v}", "length": "the {noun} {v} long",
    "mouth": "the {noun} that empties into {v}", "dimensions": "the {noun} measuring {v}",
    "discharge": "the {noun} that carries {v} of water",
}
DESCRIBE_RELATION_NP = {
    "capital": "the {noun} whose capital is {v}", "country": "the {noun} in {v}",
    "flows_through": "the {noun} that flows through {v}", "birthplace": "the {noun} born in {v}",
    "founder": "the {noun} founded by {v}", "headquarters": "the {noun} headquartered in {v}",
    "creator": "the {noun} by {v}", "housed_in": "the {noun} held by {v}",
}


def words(name: str) -> str:
    return name.replace("_", " ")


def kind_noun(kind: str) -> str:
    return KIND_NOUN.get(kind, words(kind))


def picture_noun(kind: str) -> str:
    return PICTURE_NOUN.get(kind, "picture")


def at_position(position: str) -> str:
    """"at the top-left", "in the center" of the image."""
    return f"in the {position}" if position == "center" else f"at the {position}"


def anchor_np(rng: random.Random, kind: str, position: str | None) -> str:
    """How a question points at the pictured entity: whole image (position None) or one object of a scene."""
    noun, picture = kind_noun(kind), picture_noun(kind)
    if position is None:
        if kind == "person":
            return rng.choice(("the person in this portrait", "the person shown"))
        if kind == "artwork":
            return rng.choice(("this painting", "the painting shown"))
        return rng.choice((f"the {noun} whose {picture} is shown", f"the {noun} this {picture} belongs to"))
    where = at_position(position)
    if kind == "person":
        return f"the person in the portrait {where}"
    if kind == "artwork":
        return f"the painting {where}"
    return rng.choice((f"the {noun} whose {picture} is {where}", f"the {noun} of the {picture} {where}"))


def identify_question(rng: random.Random, kind: str, position: str | None) -> str:
    noun, picture = kind_noun(kind), picture_noun(kind)
    where = at_position(position) if position else ""
    if kind == "person":
        return rng.choice((f"Who is shown in the portrait{' ' + where if where else ''}?",
                           f"Whose portrait is {where or 'this'}?"))
    if kind == "artwork":
        return rng.choice((f"What is the title of the painting{' ' + where if where else ''}?",
                           f"Which painting is {where or 'this'}?"))
    if where:
        return rng.choice((f"Which {noun} does the {picture} {where} belong to?", f"Whose {picture} is {where}?"))
    return rng.choice((f"Which {noun} does this {picture} belong to?", f"Which {noun}'s {picture} is this?"))


def relation_nps(relation: str) -> tuple[str, ...]:
    return RELATION_NP.get(relation, (f"the {words(relation)} of {{x}}",))


def fact_questions(fact: str) -> tuple[str, ...]:
    return FACT_TEMPLATES[fact][0] if fact in FACT_TEMPLATES else (f"What is the {words(fact)} of {{x}}?",)


def relation_np(rng: random.Random, relation: str, subject_np: str) -> str:
    return rng.choice(relation_nps(relation)).format(x=subject_np)


def relation_query(rng: random.Random, relation: str, subject: str) -> str:
    return rng.choice(RELATION_QUERY.get(relation, (f"{{x}} {words(relation)}",))).format(x=subject)


# The gold query's form when names must follow a space (GoldConfig.names_after_space): the words of
# the relation first, the name last, so it is written as the results print it (" Name").
NAME_LAST_QUERY = {
    "country": "country of {x}", "flows_through": "course of {x}", "birthplace": "birthplace of {x}",
    "headquarters": "headquarters of {x}", "creator": "painter of {x}", "housed_in": "collection holding {x}",
    "founded": "founding of {x}", "government": "government of {x}", "born": "year of birth of {x}",
    "died": "death of {x}", "occupation": "occupation of {x}", "type": "type of {x}", "employees": "employees of {x}",
    "year": "completion of {x}",
}


def canonical_query(relation: str, subject: str, fact: bool, name_last: bool = False) -> str:
    """The first (canonical) search query for following `relation` or looking up a fact of `subject`;
    with `name_last`, a form that ends with the name."""
    if name_last:
        templates = FACT_TEMPLATES.get(relation, ((), ()))[1] if fact else RELATION_QUERY.get(relation, ())
        ends = [t for t in (NAME_LAST_QUERY.get(relation), *templates) if t and t.endswith("{x}")]
        return (ends[0] if ends else f"{words(relation)} of {{x}}").format(x=subject)
    if fact:
        queries = FACT_TEMPLATES.get(relation, ((), (f"{{x}} {words(relation)}",)))[1]
    else:
        queries = RELATION_QUERY.get(relation, (f"{{x}} {words(relation)}",))
    return queries[0].format(x=subject)


def describe_np(kind: str, relation: str, value: str, fact: bool) -> str:
    """The noun phrase describing an entity of `kind` by a fact's value or a related entity's name."""
    template, noun = (DESCRIBE_FACT_NP if fact else DESCRIBE_RELATION_NP).get(relation), kind_noun(kind)
    return template.format(noun=noun, v=value) if template else f"the {noun} whose {words(relation)} is {value}"


def describe_query(relation: str, value: str) -> str:
    """The search that resolves a description: the relation's words and the value, e.g. "currency trudai"."""
    return f"{words(relation)} {value}"


def entity_question(rng: random.Random, kind: str, np: str) -> str:
    templates = PERSON_QUESTIONS if kind == "person" else ENTITY_QUESTIONS
    if np.startswith(f"the {kind_noun(kind)} "):  # not "Which nation is the nation that ...?"
        templates = tuple(t for t in templates if "{kind}" not in t)
    return _capitalise(rng.choice(templates).format(np=np, kind=kind_noun(kind)))


def fact_question(rng: random.Random, fact: str, subject_np: str) -> str:
    return _capitalise(rng.choice(fact_questions(fact)).format(x=subject_np))


def fact_query(rng: random.Random, fact: str, subject: str) -> str:
    queries = FACT_TEMPLATES.get(fact, ((), (f"{{x}} {words(fact)}",)))[1]
    return rng.choice(queries).format(x=subject)


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def sample_questions(n: int, seed: int = 0) -> Iterator[str]:
    """`n` questions in this module's wording that name no entity: every question family, its noun
    phrases, positions and relations, with the pictured thing as the only subject ("the flag at the
    top"). Text for a tokenizer to learn the words questions are asked with (`mmsearch model init-tiny`)."""
    rng = random.Random(f"wording:{seed}")
    kinds, positions = sorted(KIND_NOUN), sorted(POSITION_WORDS)
    relations, facts = sorted(RELATION_NP), sorted(FACT_TEMPLATES)
    for _ in range(n):
        kind, position = rng.choice(kinds), rng.choice([None, *positions])
        desc, where = f"the {picture_noun(kind)}", at_position(position or rng.choice(positions))
        form = rng.randrange(8)
        if form == 0:
            yield identify_question(rng, kind, position)
        elif form in (1, 2):
            np_ = anchor_np(rng, kind, position)
            for _ in range(form):  # one or two relations deep
                np_ = relation_np(rng, rng.choice(relations), np_)
            yield entity_question(rng, rng.choice(kinds), np_)
        elif form == 3:
            yield fact_question(rng, rng.choice(facts), anchor_np(rng, kind, position))
        elif form == 4:
            yield rng.choice(COUNT_QUESTIONS)
        elif form == 5:
            yield rng.choice(POSITION_QUESTIONS).format(desc=desc)
        elif form == 6:
            yield rng.choice(PICTURE_QUESTIONS).format(where=where)
        else:
            yield COLOUR_QUESTION.format(desc=desc, where=where)
