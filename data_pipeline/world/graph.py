"""The world's entities, their literal facts, and the relations between them.

    nation        --capital-->        city          one of the nation's own cities
    city          --country-->        nation
    river         --flows_through-->  nation
    person        --birthplace-->     city
    organisation  --founder-->        person        founded within the founder's lifetime
    organisation  --headquarters-->   city
    artwork       --creator-->        person        a painter; painted within their lifetime
    artwork       --housed_in-->      organisation  a museum or gallery

so chains run at least four hops, e.g. artwork -creator-> person -birthplace-> city -country->
nation -capital-> city. Every relation target exists, and facts agree with relations (a nation's
population exceeds the sum of its cities', an organisation is founded while its founder lives).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from data_pipeline.world.config import KindShares
from data_pipeline.world.names import NameForge, acronym, demonym
from data_pipeline.world.seeding import derive_rng

KINDS = ("nation", "city", "river", "person", "organisation", "artwork")
RELATIONS = ("capital", "country", "flows_through", "birthplace", "founder", "headquarters", "creator", "housed_in")

NATION_ENDINGS = ("ia", "ar", "esh", "ova", "and", "eth", "os", "ein")
CITY_ENDINGS = ("holm", "vik", "mere", "gard", "stead", "wick", "port", "dal", "by", "", "n", "r", "s")
RIVER_ENDINGS = ("a", "e", "in", "ul", "ar", "")
GIVEN_ENDINGS = ("a", "o", "en", "is", "el", "an", "ia", "")
SURNAME_ENDINGS = ("ard", "ev", "ens", "ric", "mond", "ane", "ell", "", "n", "s")

# government fact -> alias patterns ({b}: base name, {d}: demonym)
GOVERNMENTS = {
    "parliamentary republic": ("Republic of {b}", "{d} Republic"),
    "constitutional monarchy": ("Kingdom of {b}", "{d} Kingdom"),
    "federal republic": ("Federal Republic of {b}", "{d} Federation"),
    "principality": ("Principality of {b}",),
    "grand duchy": ("Grand Duchy of {b}",),
    "commonwealth": ("Commonwealth of {b}", "{d} Commonwealth"),
}
# (name suffix, short-form suffix or "", type fact); collections can hold artworks.
COLLECTION_TYPES = (
    ("Museum of Art", "Museum", "art museum"),
    ("Gallery", "", "art gallery"),
    ("Picture Collection", "Collection", "art collection"),
)
OTHER_ORG_TYPES = (
    ("Mining Company", "", "mining company"),
    ("Shipping Line", "", "shipping company"),
    ("Observatory", "", "astronomical observatory"),
    ("Institute of Technology", "Institute", "technical university"),
    ("Trading Company", "", "trading company"),
    ("Geographical Society", "Society", "learned society"),
    ("Academy of Sciences", "Academy", "scientific academy"),
    ("Railway Company", "Railway", "railway company"),
    ("Conservatory", "", "music conservatory"),
    ("Savings Bank", "Bank", "bank"),
    ("Botanical Garden", "", "botanical garden"),
    ("Printing House", "Press", "publishing house"),
)
OCCUPATIONS = ("astronomer", "cartographer", "engineer", "merchant", "physician", "architect", "botanist",
               "composer", "poet", "chemist", "explorer", "mathematician", "shipbuilder", "banker")
ARTWORK_FORMS = ("Nocturne", "Triptych", "Study", "Reverie", "Elegy", "Allegory", "Composition",
                 "Variations", "Fugue", "Cadence", "Meditation", "Rhapsody")
MEDIA = ("oil on canvas", "tempera on panel", "gouache on paper", "acrylic on linen", "oil on board",
         "watercolour on paper")


@dataclass
class Entity:
    id: str
    kind: str
    name: str
    aliases: list[str]
    facts: dict[str, str]
    relations: dict[str, str]

    def record(self) -> dict:
        return {"id": self.id, "name": self.name, "aliases": self.aliases, "kind": self.kind,
                "facts": self.facts, "relations": self.relations}


class World:
    """The entities in output order, with lookups both ways along relations."""

    def __init__(self, entities: list[Entity]):
        self.entities = entities
        self.by_id = {e.id: e for e in entities}
        self.incoming: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for e in entities:
            for relation, target in e.relations.items():
                self.incoming[target].append((relation, e.id))

    def of_kind(self, kind: str) -> list[Entity]:
        return [e for e in self.entities if e.kind == kind]


def mention(entity: Entity) -> str:
    """How running text refers to an entity ("the Ossuva River", but "Velora")."""
    return f"the {entity.name}" if entity.kind in ("river", "organisation") else entity.name


def kind_counts(total: int, shares: KindShares) -> dict[str, int]:
    """Split `total` entities over the kinds by largest remainder, at least one of each."""
    weights = {k: float(getattr(shares, k)) for k in KINDS}
    if total < len(KINDS):
        raise ValueError(f"entities must be at least {len(KINDS)} (one of each kind), got {total}")
    if any(w <= 0 for w in weights.values()):
        raise ValueError(f"kind shares must all be positive, got {weights}")
    spare = total - len(KINDS)
    exact = {k: spare * w / sum(weights.values()) for k, w in weights.items()}
    counts = {k: 1 + int(x) for k, x in exact.items()}
    by_remainder = sorted(KINDS, key=lambda k: (-(exact[k] - int(exact[k])), KINDS.index(k)))
    for k in by_remainder[: total - sum(counts.values())]:
        counts[k] += 1
    if counts["city"] < counts["nation"]:
        raise ValueError("kind shares give fewer cities than nations; every nation needs a capital")
    return counts


def generate_world(seed: int, total: int, shares: KindShares) -> World:
    counts = kind_counts(total, shares)
    ids = {k: [f"{k}_{i:0{max(4, len(str(n - 1)))}d}" for i in range(n)] for k, n in counts.items()}
    # Names come from one sequential stream because uniqueness is global; everything else about an
    # entity comes from its own stream.
    forge = NameForge(derive_rng(seed, "names"))

    def rng_for(entity_id: str):
        return derive_rng(seed, "entity", entity_id)

    def aliases(*candidates: str) -> list[str]:
        # A bare base word is already its owner's (the forge claimed it), so callers add it directly.
        return [a for a in candidates if forge.claim(a)]

    nations = []
    for nid in ids["nation"]:
        rng, base = rng_for(nid), forge.word(NATION_ENDINGS)
        government = rng.choice(sorted(GOVERNMENTS))
        adjective = demonym(base)
        nations.append(Entity(nid, "nation", base,
                              aliases(*(p.format(b=base, d=adjective) for p in GOVERNMENTS[government])),
                              {"government": government, "founded": str(rng.randint(1200, 1950)),
                               "currency": forge.word(syllables=(2, 2)).lower(), "official_language": adjective},
                              {}))

    cities, city_population = [], {}
    cities_of: dict[str, list[Entity]] = defaultdict(list)
    for i, cid in enumerate(ids["city"]):
        rng, name = rng_for(cid), forge.word(CITY_ENDINGS, syllables=(1, 2))
        # The first cities go one to each nation so that every nation has a capital to choose.
        nation = nations[i] if i < len(nations) else rng.choice(nations)
        population = int(math.exp(rng.uniform(math.log(5_000), math.log(2_500_000))))
        city_population[cid] = population
        city = Entity(cid, "city", name, aliases(f"City of {name}"),
                      {"founded": str(rng.randint(600, 1900)), "population": f"{population:,}",
                       "elevation": f"{rng.randint(2, 2400):,} m"},
                      {"country": nation.id})
        cities.append(city)
        cities_of[nation.id].append(city)
    for nation in nations:
        rng = rng_for(nation.id)
        nation.relations["capital"] = rng.choice(cities_of[nation.id]).id
        # Cities hold only part of a nation's people, so the total always exceeds their sum.
        inhabitants = sum(city_population[c.id] for c in cities_of[nation.id]) * rng.uniform(2.0, 8.0)
        nation.facts["population"] = (f"{inhabitants / 1e6:.1f} million" if inhabitants >= 1e6
                                      else f"{round(inhabitants, -3):,.0f}")

    seas = [forge.word(syllables=(2, 2)) for _ in range(max(2, counts["river"] // 5))]
    rivers = []
    for rid in ids["river"]:
        rng, base = rng_for(rid), forge.word(RIVER_ENDINGS)
        length = rng.randint(40, 4200)
        rivers.append(Entity(rid, "river", f"{base} River", aliases(f"River {base}") + [base],
                             {"length": f"{length:,} km",
                              "discharge": f"{int(length * rng.uniform(0.2, 4.0)):,} m³/s",
                              "mouth": f"the {rng.choice(seas)} Sea"},
                             {"flows_through": rng.choice(nations).id}))

    given_names = [forge.word(GIVEN_ENDINGS, syllables=(2, 2)) for _ in range(max(8, counts["person"] // 3))]
    people, painters = [], []
    for i, pid in enumerate(ids["person"]):
        rng = rng_for(pid)
        given, surname = rng.choice(given_names), forge.word(SURNAME_ENDINGS)
        born = rng.randint(1550, 1930)
        # Every third person paints, so artworks always have creators to choose from.
        occupation = "painter" if i % 3 == 0 else rng.choice(OCCUPATIONS)
        person = Entity(pid, "person", f"{given} {surname}", aliases(f"{given[0]}. {surname}") + [surname],
                        {"born": str(born), "died": str(born + rng.randint(30, 92)), "occupation": occupation},
                        {"birthplace": rng.choice(cities).id})
        forge.claim(person.name)
        people.append(person)
        if occupation == "painter":
            painters.append(person)

    by_id = {e.id: e for e in nations + cities + people}
    organisations, collections = [], []
    for i, oid in enumerate(ids["organisation"]):
        rng, base = rng_for(oid), forge.word()
        # Every fourth organisation keeps art, so artworks always have somewhere to hang.
        holds_art = i % 4 == 0
        suffix, short, org_type = rng.choice(COLLECTION_TYPES if holds_art else OTHER_ORG_TYPES)
        name = f"{base} {suffix}"
        forge.claim(name)
        initials = acronym(name)
        founder = rng.choice(people)
        born, died = int(founder.facts["born"]), int(founder.facts["died"])
        home_nation = by_id[founder.relations["birthplace"]].relations["country"]
        # Most founders set up at home; the rest anywhere.
        hq = rng.choice(cities_of[home_nation] if rng.random() < 0.6 else cities)
        org = Entity(oid, "organisation", name,
                     aliases(*([initials] if len(initials) >= 3 else []), *([f"{base} {short}"] if short else [])),
                     {"type": org_type, "founded": str(rng.randint(born + 20, died)),
                      "employees": f"{rng.randint(8, 600) if holds_art else rng.randint(20, 40_000):,}"},
                     {"founder": founder.id, "headquarters": hq.id})
        organisations.append(org)
        if holds_art:
            collections.append(org)

    artworks = []
    for aid in ids["artwork"]:
        rng, base = rng_for(aid), forge.word()
        form = rng.choice(ARTWORK_FORMS)
        name = f"{base} {form}"
        forge.claim(name)
        creator = rng.choice(painters)
        born, died = int(creator.facts["born"]), int(creator.facts["died"])
        artworks.append(Entity(aid, "artwork", name, aliases(f"{form} of {base}"),
                               {"year": str(rng.randint(born + 16, died)), "medium": rng.choice(MEDIA),
                                "dimensions": f"{rng.randint(20, 240)} × {rng.randint(20, 240)} cm"},
                               {"creator": creator.id, "housed_in": rng.choice(collections).id}))

    return World(nations + cities + rivers + people + organisations + artworks)
