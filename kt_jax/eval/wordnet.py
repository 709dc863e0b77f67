"""Offline WordNet for NLTK's METEOR: build NLTK's data dir from Debian's wordnet-base files at first use."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from kt_jax.errors import KtJaxError

DEBIAN_WORDNET = Path("/usr/share/wordnet")
REQUIRED = ("data.noun", "data.verb", "data.adj", "data.adv", "index.noun", "index.verb", "index.adj", "index.adv",
            "index.sense", "noun.exc", "verb.exc", "adj.exc", "adv.exc")

# WordNet 3.0 lexicographer files (lexnames(5WN)): number, name, syntactic category (1 noun .. 4 adverb).
LEXNAMES = (
    "adj.all 3", "adj.pert 3", "adv.all 4", "noun.Tops 1", "noun.act 1", "noun.animal 1", "noun.artifact 1",
    "noun.attribute 1", "noun.body 1", "noun.cognition 1", "noun.communication 1", "noun.event 1",
    "noun.feeling 1", "noun.food 1", "noun.group 1", "noun.location 1", "noun.motive 1", "noun.object 1",
    "noun.person 1", "noun.phenomenon 1", "noun.plant 1", "noun.possession 1", "noun.process 1",
    "noun.quantity 1", "noun.relation 1", "noun.shape 1", "noun.state 1", "noun.substance 1", "noun.time 1",
    "verb.body 2", "verb.change 2", "verb.cognition 2", "verb.communication 2", "verb.competition 2",
    "verb.consumption 2", "verb.contact 2", "verb.creation 2", "verb.emotion 2", "verb.motion 2",
    "verb.perception 2", "verb.possession 2", "verb.social 2", "verb.stative 2", "verb.weather 2", "adj.ppl 3",
)


class WordNetMissingError(KtJaxError):
    """WordNet data is neither in NLTK's data path nor installable from the Debian files."""


def default_cache_dir() -> Path:
    """$KT_JAX_CACHE, else ~/.cache/kt_jax."""
    return Path(os.environ.get("KT_JAX_CACHE", Path.home() / ".cache" / "kt_jax"))


def lexnames_text() -> str:
    """The WordNet 3.0 `lexnames` file (tab separated: number, name, category)."""
    return "".join(f"{i:02d}\t{name}\t{cat}\n" for i, (name, cat) in enumerate(x.split() for x in LEXNAMES))


def build_nltk_wordnet(source: Path, nltk_data: Path) -> Path:
    """Copy the WordNet dict files from `source` into `nltk_data/corpora/wordnet` (+ lexnames); returns it."""
    missing = [f for f in REQUIRED if not (source / f).is_file()]
    if missing:
        raise WordNetMissingError(
            f"{source}: WordNet file(s) {', '.join(missing)} missing; install them with "
            "`apt-get install -y --no-install-recommends wordnet-base wordnet-sense-index` (see .ci/setup-system)"
        )
    target = nltk_data / "corpora" / "wordnet"
    tmp = target.with_name(f"wordnet.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in source.iterdir():
        if f.is_file():
            shutil.copyfile(f, tmp / f.name)  # copies, not links: NLTK seeks in these files
    (tmp / "lexnames").write_text(lexnames_text())
    if target.exists():
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, target)
    return target


def ensure_wordnet(cache_dir: str | Path | None = None, source: str | Path | None = None) -> Path:
    """Make `nltk.corpus.wordnet` loadable offline; returns the NLTK data dir that holds it."""
    import nltk

    try:
        nltk.data.find("corpora/wordnet")
        return Path(str(nltk.data.find("corpora/wordnet"))).parents[1]
    except LookupError:
        pass
    nltk_data = Path(cache_dir or default_cache_dir()) / "nltk_data"
    if not (nltk_data / "corpora" / "wordnet" / "lexnames").is_file():
        build_nltk_wordnet(Path(source or os.environ.get("KT_JAX_WORDNET_SRC", DEBIAN_WORDNET)), nltk_data)
    if str(nltk_data) not in nltk.data.path:
        nltk.data.path.insert(0, str(nltk_data))
    return nltk_data
