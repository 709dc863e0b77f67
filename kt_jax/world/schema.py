"""The fictional world's schema: entity kinds, their attributes in canonical (chronological) order, wordings.

Every attribute has a value type, the keywords that mark it in a sentence (used by the checker to tell two
attributes with the same value type apart, e.g. born/died years), sentence templates (index 0 is the canonical
wording used in QA answers; the others vary the pretraining corpus), and an optional narrow question.
Each template states exactly one fact and names its subject, so a sentence splitter yields one fact a sentence.
The canonical first sentence of every kind starts "In {year}, {name} ...": the name then follows a space, the same
byte-level BPE token form as in the question "Tell me about {name}.", which a tiny model copies far more reliably
than the sentence-initial form (measured: see the issue-7 world note).
"""

from __future__ import annotations

from dataclasses import dataclass

ENTITY_KINDS = ("person", "org", "place", "artefact")
VALUE_TYPES = (*ENTITY_KINDS, "year", "number", "profession", "goods", "material", "region", "river")


@dataclass(frozen=True)
class AttrSpec:
    """One attribute of an entity kind."""

    name: str
    value_type: str
    keywords: tuple[str, ...]  # lowercase word prefixes / phrases that mark this attribute in a sentence
    templates: tuple[str, ...]  # "{e}" subject, "{v}" value; index 0 = canonical answer wording
    optional: bool = False
    label: str = ""  # short human name, e.g. "birth year"


def _a(name: str, vt: str, kws: str, templates: tuple[str, ...], optional: bool = False, label: str = "") -> AttrSpec:
    return AttrSpec(name, vt, tuple(kws.split("|")), templates, optional, label or name.replace("_", " "))


SCHEMA: dict[str, tuple[AttrSpec, ...]] = {
    "person": (
        _a("birth_year", "year", "born|birth", (
            "In {v}, {e} was born.", "{e} was born in {v}.", "{e} was born in the year {v}.",
            "The birth of {e} took place in {v}.")),
        _a("birthplace", "place", "born|birth|native", (
            "{e} was born in {v}.", "{e} is a native of {v}.", "The birthplace of {e} was {v}.",
            "{e} was born in the town of {v}.")),
        _a("school", "org", "studied|educated|trained|school|student|pupil", (
            "{e} studied at {v}.", "{e} was educated at {v}.", "{e} trained at {v}.",
            "As a young student, {e} attended {v}."), optional=True),
        _a("profession", "profession", "profession|trade|worked as|occupation", (
            "{e} was a {v}.", "{e} worked as a {v}.", "By trade, {e} was a {v}.", "The profession of {e} was {v}.")),
        _a("employer", "org", "worked|work|joined|employ|served|member|career", (
            "{e} worked for {v}.", "{e} joined {v}.", "{e} was employed by {v}.", "{e} served {v} for many years.")),
        _a("creation", "artefact", "made|maker|crafted|built|created|creator|forged|designed", (
            "{e} made {v}.", "{e} crafted {v}.", "{e} is the maker of {v}.", "{e} created {v}."), optional=True),
        _a("residence", "place", "moved|settled|lived|resided|relocated|later years", (
            "{e} later moved to {v}.", "{e} settled in {v}.", "{e} spent the later years in {v}.",
            "{e} lived in {v} in old age."), optional=True),
        _a("death_year", "year", "died|death|passed", (
            "{e} died in {v}.", "{e} passed away in {v}.", "The death of {e} came in {v}.",
            "{e} died in the year {v}.")),
    ),
    "org": (
        _a("founded_year", "year", "founded|establish|formed|set up|dates|created|origin", (
            "In {v}, {e} was founded.", "{e} was founded in {v}.", "{e} was established in {v}.",
            "{e} dates from {v}.")),
        _a("founder", "person", "founded|founder|establish|formed|set up|created", (
            "{e} was founded by {v}.", "The founder of {e} was {v}.", "{e} was established by {v}.",
            "{e} was set up by {v}.")),
        _a("seat", "place", "based|headquarter|seat|located|sits|home", (
            "{e} is based in {v}.", "{e} has its seat in {v}.", "{e} is headquartered in {v}.",
            "The home of {e} is {v}.")),
        _a("sector", "goods", "trade|deals|deal|sector|business|specialis", (
            "{e} trades in {v}.", "{e} deals in {v}.", "The business of {e} is {v}.", "{e} is in the {v} trade.")),
        _a("members", "number", "member|counts|count|staff", (
            "{e} has {v} members.", "{e} counts {v} members.", "The membership of {e} is {v}.",
            "{e} has a membership of {v}.")),
        _a("rival", "org", "rival|compet|feud", (
            "{e} is a rival of {v}.", "{e} competes with {v}.", "The main rival of {e} is {v}.",
            "{e} has a long feud with {v}."), optional=True),
        _a("dissolved_year", "year", "dissolved|disbanded|closed|ended|ceased|collapsed", (
            "{e} was dissolved in {v}.", "{e} was disbanded in {v}.", "{e} closed in {v}.",
            "{e} ceased to exist in {v}."), optional=True),
    ),
    "place": (
        _a("founded_year", "year", "founded|establish|settled|built|dates", (
            "In {v}, {e} was founded.", "{e} was founded in {v}.", "{e} was established in {v}.",
            "{e} was first settled in {v}.")),
        _a("region", "region", "lies|located|region|part of|situated", (
            "{e} lies in the {v}.", "{e} is located in the {v}.", "{e} is part of the {v}.",
            "{e} is situated in the {v}.")),
        _a("river", "river", "river|banks", (
            "{e} stands on the river {v}.", "{e} lies on the river {v}.", "{e} is built on the banks of the river {v}.",
            "The river {v} flows through {e}.")),
        _a("famous_for", "goods", "known|famous|renowned|noted", (
            "{e} is known for its {v}.", "{e} is famous for its {v}.", "{e} is renowned for {v}.",
            "{e} is noted for its {v}.")),
        _a("population", "number", "population|inhabitant|resident|people|home to", (
            "{e} has a population of {v}.", "{e} has {v} inhabitants.", "The population of {e} is {v}.",
            "{e} is home to {v} people.")),
        _a("twin", "place", "twin|sister|partner", (
            "{e} is twinned with {v}.", "{e} is a sister town of {v}.", "{e} has a twin town in {v}.",
            "{e} and its partner town {v} share a festival."), optional=True),
    ),
    "artefact": (
        _a("made_year", "year", "made|built|crafted|created|forged|completed|finished|dates", (
            "In {v}, {e} was made.", "{e} was made in {v}.", "{e} was crafted in {v}.", "{e} was completed in {v}.")),
        _a("maker", "person", "made|maker|built|crafted|created|creator|forged|work of", (
            "{e} was made by {v}.", "{e} was crafted by {v}.", "The maker of {e} was {v}.", "{e} is the work of {v}.")),
        _a("material", "material", "made of|made from|material|cast in|carved", (
            "{e} is made of {v}.", "{e} is made from {v}.", "The material of {e} is {v}.", "{e} is cast in {v}.")),
        _a("weight", "number", "weigh", (
            "{e} weighs {v} kilograms.", "{e} has a weight of {v} kilograms.", "The weight of {e} is {v} kilograms.",
            "{e} weighs about {v} kilograms.")),
        _a("stolen_year", "year", "stolen|theft|stole", (
            "{e} was stolen in {v}.", "{e} was taken by thieves and stolen in {v}.",
            "The theft of {e} happened in {v}.",
            "In {v}, {e} was stolen."), optional=True),
        _a("kept_at", "place", "kept|housed|displayed|stored|rests|held|shown", (
            "{e} is kept in {v}.", "{e} is housed in {v}.", "{e} is displayed in {v}.", "{e} now rests in {v}.")),
    ),
}

# Narrow questions: (question template, attributes it asks for) per kind; "{e}" is the entity's name.
NARROW_QUESTIONS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "person": (
        ("When and where was {e} born?", ("birth_year", "birthplace")),
        ("What was the working life of {e}?", ("profession", "employer")),
        ("When did {e} die?", ("death_year",)),
        ("Where did {e} study and what did {e} make?", ("school", "creation")),
    ),
    "org": (
        ("Who founded {e}, and when?", ("founded_year", "founder")),
        ("Where is {e} based and what does it trade in?", ("seat", "sector")),
        ("How many members does {e} have?", ("members",)),
    ),
    "place": (
        ("Where does {e} lie?", ("region", "river")),
        ("When was {e} founded?", ("founded_year",)),
        ("How many people live in {e}, and what is it known for?", ("famous_for", "population")),
    ),
    "artefact": (
        ("Who made {e}, and when?", ("made_year", "maker")),
        ("What is {e} made of and how heavy is it?", ("material", "weight")),
        ("Where is {e} kept?", ("kept_at",)),
    ),
}
# More narrow questions (one attribute, or another pair) that fill the question pool: held-out entities can be asked
# many questions each (statistical power) while the knowledge backend's rewrites keep to NARROW_QUESTIONS above.
EXTRA_NARROW_QUESTIONS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "person": (
        ("In what year was {e} born?", ("birth_year",)),
        ("Where was {e} born?", ("birthplace",)),
        ("Where did {e} study?", ("school",)),
        ("What was the profession of {e}?", ("profession",)),
        ("Who did {e} work for?", ("employer",)),
        ("What did {e} make?", ("creation",)),
        ("Where did {e} live in later years?", ("residence",)),
        ("When was {e} born, and when did {e} die?", ("birth_year", "death_year")),
        ("Where was {e} born, and where did {e} settle later?", ("birthplace", "residence")),
        ("What was the profession of {e}, and where did {e} study?", ("school", "profession")),
        ("Who did {e} work for, and what did {e} make?", ("employer", "creation")),
        ("When did {e} die, and where did {e} live in later years?", ("residence", "death_year")),
        ("In what year was {e} born, and what was the profession of {e}?", ("birth_year", "profession")),
    ),
    "org": (
        ("When was {e} founded?", ("founded_year",)),
        ("Who founded {e}?", ("founder",)),
        ("Where is {e} based?", ("seat",)),
        ("What does {e} trade in?", ("sector",)),
        ("Who is the rival of {e}?", ("rival",)),
        ("When was {e} dissolved?", ("dissolved_year",)),
        ("When was {e} founded, and when was it dissolved?", ("founded_year", "dissolved_year")),
        ("Who founded {e}, and where is it based?", ("founder", "seat")),
        ("What does {e} trade in, and who is its rival?", ("sector", "rival")),
        ("When was {e} founded, and how many members does it have?", ("founded_year", "members")),
    ),
    "place": (
        ("In which region does {e} lie?", ("region",)),
        ("On which river does {e} stand?", ("river",)),
        ("What is {e} known for?", ("famous_for",)),
        ("How many people live in {e}?", ("population",)),
        ("Which town is {e} twinned with?", ("twin",)),
        ("When was {e} founded, and where does it lie?", ("founded_year", "region")),
        ("When was {e} founded, and what is it known for?", ("founded_year", "famous_for")),
        ("On which river does {e} stand, and which town is it twinned with?", ("river", "twin")),
        ("How many people live in {e}, and in which region does it lie?", ("region", "population")),
    ),
    "artefact": (
        ("When was {e} made?", ("made_year",)),
        ("Who made {e}?", ("maker",)),
        ("What is {e} made of?", ("material",)),
        ("How heavy is {e}?", ("weight",)),
        ("When was {e} stolen?", ("stolen_year",)),
        ("Who made {e}, and where is it kept?", ("maker", "kept_at")),
        ("When was {e} made, and what is it made of?", ("made_year", "material")),
        ("Where is {e} kept, and how heavy is it?", ("weight", "kept_at")),
        ("Who made {e}, and when was it stolen?", ("maker", "stolen_year")),
    ),
}
QUESTION_POOL = {kind: NARROW_QUESTIONS[kind] + EXTRA_NARROW_QUESTIONS[kind] for kind in NARROW_QUESTIONS}
OVERVIEW_QUESTION = "Tell me about {e}."


def attr_spec(kind: str, name: str) -> AttrSpec:
    """The spec of attribute `name` of entity kind `kind`."""
    for spec in SCHEMA[kind]:
        if spec.name == name:
            return spec
    raise KeyError(f"{kind}.{name}")


def canonical_index(kind: str, name: str) -> int:
    """Position of attribute `name` in its kind's canonical order."""
    return [s.name for s in SCHEMA[kind]].index(name)
