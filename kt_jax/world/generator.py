"""A seeded fictional world: people, organisations, places and artefacts with syllable names and linked facts."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Any

from kt_jax.errors import ConfigError, DataError
from kt_jax.world.schema import ENTITY_KINDS, QUESTION_POOL, SCHEMA

SYLLABLES = (
    "ka", "ven", "dor", "mi", "len", "tas", "mo", "ra", "ol", "rin", "bel", "sa", "thu", "gri", "vo", "nel", "fa",
    "zu", "kel", "pe", "dra", "ish", "om", "ta", "lu", "ber", "cor", "an", "vy", "ses", "qua", "mir", "tol", "esh",
    "yar", "bo", "nim", "ul", "fen", "ro", "gal", "ith", "dun", "ca", "mer", "wy", "pol", "sar", "ti", "hes", "gor",
    "ny", "lam", "bri"
)
PROFESSIONS = ("cartographer", "glassblower", "astronomer", "weaver", "shipwright", "physician", "clockmaker",
               "scribe", "brewer", "mason", "herbalist", "composer", "bookbinder", "potter", "surveyor", "jeweller")
GOODS = ("salt", "timber", "wool", "spices", "paper", "ink", "silk", "honey", "amber", "tea", "rope", "candles",
         "lace", "cheese", "dyes", "pearls")
MATERIALS = ("bronze", "oak", "marble", "silver", "bone", "jade", "iron", "clay", "ivory", "glass", "copper", "ebony")
ORG_SUFFIXES = ("Guild", "Company", "Academy", "Society", "League", "Trading House", "Brotherhood", "Institute")
ARTEFACT_NOUNS = ("Lantern", "Astrolabe", "Crown", "Compass", "Chalice", "Harp", "Mirror", "Clock", "Globe",
                  "Tapestry", "Sceptre", "Bell", "Map", "Shield")
REGION_SUFFIXES = ("Valley", "Coast", "Highlands", "Marches", "Plains", "Lakelands")


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """Size and layout of a generated world (embeddable in a pipeline config as `world:`)."""

    seed: int = 0
    num_people: int = 24
    num_orgs: int = 10
    num_places: int = 10
    num_artefacts: int = 12
    num_regions: int = 4
    num_rivers: int = 5
    test_fraction: float = 0.25  # share of each kind's entities whose questions form the test split
    valid_fraction: float = 0.0  # share of each kind's entities whose questions form the validation split
    # share of each kind's entities that only pretraining sees, with their QA pairs in the corpus (Allen-Zhu and
    # Li's "mixed training": the base model learns to answer from stored knowledge on entities no split asks about)
    qa_fraction: float = 0.0
    descriptions_per_entity: int = 4  # corpus documents per entity (varied wording)
    permute_descriptions: bool = False  # each description states the facts in a fresh random order
    narrow_questions: int = 1  # narrow questions per entity (besides "Tell me about X.")
    # narrow questions per validation and test entity (None: narrow_questions); more questions per held-out entity
    # narrow the test's confidence intervals without a larger corpus (questions of one entity are correlated, so
    # the report also gives the interval with whole entities resampled)
    heldout_narrow_questions: int | None = None
    corpus_qa: bool = False  # add the fine-tuning train split's QA pairs to the corpus (the old, leaky regime)
    # first line of each corpus description ("" = none); "About {e}" puts the name in the same token form (after a
    # space) as the question "Tell me about {e}." does, so the model learns to copy it into the first sentence.
    title: str = "About {e}"
    optional_prob: float = 0.5  # chance that an entity has each optional attribute

    def __post_init__(self) -> None:
        for name in ("num_people", "num_orgs", "num_places", "num_artefacts", "num_regions", "num_rivers"):
            if getattr(self, name) < 2:
                raise ConfigError(f"world.{name}={getattr(self, name)}; must be >= 2")
        if self.num_artefacts > self.num_people:
            raise ConfigError(f"world.num_artefacts={self.num_artefacts} exceeds world.num_people={self.num_people} "
                              "(each artefact has its own maker)")
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"world.test_fraction={self.test_fraction}; must be in (0, 1)")
        for name in ("valid_fraction", "qa_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"world.{name}={getattr(self, name)}; must be in [0, 1)")
        if self.test_fraction + self.valid_fraction + self.qa_fraction >= 1.0:
            raise ConfigError("world.test_fraction + valid_fraction + qa_fraction must leave entities for training "
                              f"(sum {self.test_fraction + self.valid_fraction + self.qa_fraction:g} >= 1)")
        if self.descriptions_per_entity < 1:
            raise ConfigError(f"world.descriptions_per_entity={self.descriptions_per_entity}; must be >= 1")
        most = max(len(pool) for pool in QUESTION_POOL.values())
        for name in ("narrow_questions", "heldout_narrow_questions"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= most:
                raise ConfigError(f"world.{name}={value}; must be in 0..{most} (the largest kind's question pool; "
                                  "an entity gets as many as it has attributes for)")


@dataclasses.dataclass
class Entity:
    """One entity: `facts` maps attribute name -> value (int, vocabulary word, or another entity's id)."""

    id: str
    kind: str
    name: str  # core name used for matching, e.g. "Velmar Guild"
    article: str  # "the" for organisations and artefacts, "" otherwise
    facts: dict[str, Any]

    @property
    def display(self) -> str:
        """The name as used inside a sentence, e.g. "the Velmar Guild"."""
        return f"{self.article} {self.name}" if self.article else self.name

    def ordered_facts(self) -> list[tuple[str, Any]]:
        """(attribute, value) pairs in the canonical order of the kind's schema."""
        return [(s.name, self.facts[s.name]) for s in SCHEMA[self.kind] if s.name in self.facts]


@dataclasses.dataclass
class World:
    """All entities plus vocabulary; the id lists are disjoint groups of entities.

    train/valid/test: the fine-tuning splits' entities; qa: pretraining-only entities whose QA pairs the corpus holds.
    Every entity, whatever its group, is described in the corpus.
    """

    config: WorldConfig
    entities: dict[str, Entity]
    regions: list[str]
    rivers: list[str]
    train_ids: list[str]
    test_ids: list[str]
    valid_ids: list[str] = dataclasses.field(default_factory=list)
    qa_ids: list[str] = dataclasses.field(default_factory=list)

    def by_name(self, name: str) -> Entity:
        """The entity whose core or display name is `name`."""
        for ent in self.entities.values():
            if name in (ent.name, ent.display):
                return ent
        raise DataError(f"world: no entity named {name!r}")

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable form (see `World.from_json`)."""
        return {"config": dataclasses.asdict(self.config), "regions": self.regions, "rivers": self.rivers,
                "train_ids": self.train_ids, "test_ids": self.test_ids, "valid_ids": self.valid_ids,
                "qa_ids": self.qa_ids, "entities": [dataclasses.asdict(e) for e in self.entities.values()]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> World:
        """Inverse of `to_json`."""
        ents = {e["id"]: Entity(**e) for e in data["entities"]}
        return cls(WorldConfig(**data["config"]), ents, list(data["regions"]), list(data["rivers"]),
                   list(data["train_ids"]), list(data["test_ids"]), list(data.get("valid_ids", [])),
                   list(data.get("qa_ids", [])))

    def save(self, path: str | Path) -> Path:
        """Write the world as JSON."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> World:
        """Read a world written by `save`."""
        try:
            return cls.from_json(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DataError(f"{path}: not a world file ({exc})") from exc


class _Namer:
    """Unique capitalised syllable words (no word is reused anywhere in the world)."""

    def __init__(self, rng: random.Random):
        self.rng, self.used = rng, set()

    def word(self, lo: int = 2, hi: int = 2) -> str:
        for _ in range(10_000):
            w = "".join(self.rng.choice(SYLLABLES) for _ in range(self.rng.randint(lo, hi))).capitalize()
            if w not in self.used and len(w) >= 4:
                self.used.add(w)
                return w
        raise ConfigError("world: ran out of syllable names; make the world smaller")


def _people(cfg: WorldConfig, rng: random.Random, namer: _Namer) -> list[Entity]:
    out = []
    for i in range(cfg.num_people):
        birth = rng.randint(1600, 1850)
        facts = {"birth_year": birth, "profession": rng.choice(PROFESSIONS), "death_year": birth + rng.randint(40, 88)}
        out.append(Entity(f"person{i}", "person", f"{namer.word()} {namer.word(2, 3)}", "", facts))
    return out


def _number(rng: random.Random, lo: int, hi: int, step: int) -> int:
    return rng.randrange(lo // step, hi // step + 1) * step


def generate_world(cfg: WorldConfig) -> World:
    """Build a world deterministically from `cfg.seed` (same config -> identical world)."""
    rng = random.Random(cfg.seed)
    namer = _Namer(rng)
    opt = lambda: rng.random() < cfg.optional_prob
    regions = [f"{namer.word()} {rng.choice(REGION_SUFFIXES)}" for _ in range(cfg.num_regions)]
    rivers = [namer.word() for _ in range(cfg.num_rivers)]
    people = _people(cfg, rng, namer)
    places = []
    for i in range(cfg.num_places):
        facts = {"founded_year": rng.randint(1100, 1590), "region": rng.choice(regions), "river": rng.choice(rivers),
                 "famous_for": rng.choice(GOODS), "population": _number(rng, 2500, 98000, 100)}
        places.append(Entity(f"place{i}", "place", namer.word(2, 3), "", facts))
    for p in places:
        if opt():
            p.facts["twin"] = rng.choice([q.id for q in places if q.id != p.id])
    orgs = []
    for i in range(cfg.num_orgs):
        founder = rng.choice(people)
        year = rng.randint(founder.facts["birth_year"] + 20, founder.facts["death_year"] - 2)
        facts = {"founded_year": year, "founder": founder.id, "seat": rng.choice(places).id,
                 "sector": rng.choice(GOODS), "members": _number(rng, 20, 990, 10)}
        if opt():
            facts["dissolved_year"] = min(year + rng.randint(20, 160), 1990)
        orgs.append(Entity(f"org{i}", "org", f"{namer.word()} {rng.choice(ORG_SUFFIXES)}", "the", facts))
    for o in orgs:
        if opt():
            o.facts["rival"] = rng.choice([q.id for q in orgs if q.id != o.id])
    for p in people:
        b, d = p.facts["birth_year"], p.facts["death_year"]
        p.facts["birthplace"] = rng.choice(places).id
        alive = [o.id for o in orgs if o.facts["founded_year"] < d - 5] or [o.id for o in orgs]
        p.facts["employer"] = rng.choice(alive)
        if opt():
            p.facts["school"] = rng.choice([o for o in alive if o != p.facts["employer"]] or alive)
        if opt():
            p.facts["residence"] = rng.choice([q.id for q in places if q.id != p.facts["birthplace"]])
        del b
    makers = rng.sample(people, cfg.num_artefacts)
    artefacts = []
    for i, maker in enumerate(makers):
        made = rng.randint(maker.facts["birth_year"] + 18, maker.facts["death_year"])
        facts = {"made_year": made, "maker": maker.id, "material": rng.choice(MATERIALS),
                 "weight": rng.randint(2, 900), "kept_at": rng.choice(places).id}
        if opt():
            facts["stolen_year"] = min(made + rng.randint(5, 200), 1995)
        artefacts.append(Entity(f"artefact{i}", "artefact", f"{namer.word()} {rng.choice(ARTEFACT_NOUNS)}", "the",
                                facts))
        maker.facts["creation"] = f"artefact{i}"
    entities = {e.id: e for e in [*people, *orgs, *places, *artefacts]}
    groups: dict[str, list[str]] = {"train": [], "test": [], "valid": [], "qa": []}
    for kind in ENTITY_KINDS:
        ids = [e.id for e in entities.values() if e.kind == kind]
        rng.shuffle(ids)
        cut = 0
        for name, fraction, least in (("test", cfg.test_fraction, 1), ("valid", cfg.valid_fraction, 0),
                                      ("qa", cfg.qa_fraction, 0)):
            n = max(least, round(len(ids) * fraction)) if fraction else 0
            groups[name] += sorted(ids[cut:cut + n], key=_id_key)
            cut += n
        if cut >= len(ids):
            raise ConfigError(f"world: no {kind} entities left for the train split; make the fractions smaller")
        groups["train"] += sorted(ids[cut:], key=_id_key)
    return World(cfg, entities, regions, rivers, groups["train"], groups["test"], groups["valid"], groups["qa"])


def _id_key(entity_id: str) -> tuple[str, int]:
    kind = entity_id.rstrip("0123456789")
    return kind, int(entity_id[len(kind):])
