"""Nouns from image captions (OVSeg §3.2: "we extract all nouns using an off-the-shelf language parser").

Pipeline per caption: NLTK's word tokenizer (`NLTKWordTokenizer`, needs no data) → a POS tagger →
nouns (Penn tags NN, NNS, NNP, NNPS) → WordNet lemma (plural → singular) → compounds → stop-nouns
dropped → unique, in caption order.

**Taggers** (`NounConfig.tagger`, always explicit; a missing resource is an error that prints the
command that installs it, never a silent fallback):

- ``nltk-default``: NLTK's standard averaged-perceptron tagger (`averaged_perceptron_tagger_eng`),
  what ``nltk.pos_tag`` uses and what a real COCO run should use. It needs NLTK's downloader
  (internet): ``python -m nltk.downloader -d .ovseg/nltk_data averaged_perceptron_tagger_eng``.
- ``penn-hmm``: offline and real: NLTK's `HiddenMarkovModelTagger` parameterised with Penn Treebank
  word/tag counts and tag-transition probabilities that Debian ships in `liblingua-en-tagger-perl`
  (installed into NLTK_DATA by ``bash scripts/install_nltk_data.sh``). Unknown words get the
  package's suffix-class tag distribution, narrowed to the parts of speech WordNet knows for them.
- ``trained:<path>``: NLTK's `PerceptronTagger(load=False)` trained on a ``word/TAG`` file (one
  sentence a line, Penn tags), e.g. the embedded world's ``data/world/pos_tagged_captions.txt``.
  Honest for that world's captions, not for real English.

**Lemmas** come from WordNet (`corpora/wordnet`; the Debian WordNet 3.0 files that
``scripts/install_nltk_data.sh`` installs, or NLTK's own download). For a plural-tagged word the
singular analysis is taken ("men" → man, "teeth" → tooth), except for words in ``keep_plural``
(pants, glasses, scissors: plural-only objects whose singular means something else).

**Compounds**: a run of 2–3 *noun-tagged* tokens that WordNet lists as one noun is kept as one noun
("fire hydrant", "tennis racket", "traffic light"); other noun runs give each noun ("kitchen
counter" → kitchen, counter). Adjective + noun is not merged from WordNet, because WordNet cannot
tell a lexicalised compound (hot dog) from a description (a yellow jacket, a white house, a young
man); only the multi-word names in ``extra_compounds`` (by default COCO's multi-word category
names, e.g. "hot dog", "stop sign", "cell phone") are kept whole whatever the tags.
"""
from __future__ import annotations

import functools
import math
import random
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import nltk
import yaml
from nltk.corpus import CorpusReader, LazyCorpusLoader
from nltk.corpus.reader.wordnet import WordNetCorpusReader
from nltk.probability import DictionaryConditionalProbDist, DictionaryProbDist, ProbDistI
from nltk.tag import PerceptronTagger
from nltk.tag.api import TaggerI
from nltk.tag.hmm import HiddenMarkovModelTagger
from nltk.tag.util import str2tuple
from nltk.tokenize import NLTKWordTokenizer

from .errors import DataError

INSTALL_OFFLINE_COMMAND = "bash scripts/install_nltk_data.sh"


class WordNet30(WordNetCorpusReader):
    """NLTK's WordNet reader, without the map it builds on load from WordNet 3.0 to the loaded version.
    That map serves the multilingual (OMW) data, which nothing here uses; for the 3.0 files themselves
    NLTK maps them onto themselves, reading index.sense twice: 3.4 of the 6.6 s a process spent
    loading WordNet (measured on 2026-12-02), once in every stage that extracts nouns."""

    def map_wn(self, version: str = "wordnet") -> None:
        return None


# `nltk.corpus.wordnet` with the reader above: the same files, found on the same NLTK data path.
wordnet = LazyCorpusLoader("wordnet", WordNet30,
                           LazyCorpusLoader("omw-2.0", CorpusReader, r".*/wn-data-.*\.tab", encoding="utf8"))
NOUN_TAGS = frozenset({"NN", "NNS", "NNP", "NNPS"})
PLURAL_TAGS = frozenset({"NNS", "NNPS"})

# Nouns that name a position, the picture itself, or a quantity/collection rather than a thing.
DEFAULT_STOP_NOUNS: tuple[str, ...] = (
    "top", "bottom", "side", "front", "back", "middle", "center", "centre", "edge", "end", "corner",
    "left", "right", "inside", "outside", "distance", "part", "piece", "way", "area", "scene",
    "picture", "image", "photo", "photograph", "view", "shot", "close", "closeup", "background",
    "foreground", "couple", "group", "lot", "lots", "bunch", "pair", "kind", "type", "sort",
    "variety", "number", "set", "assortment", "collection", "array", "selection", "row", "line",
    "pile", "stack", "herd", "flock", "thing", "something", "one", "day", "time",
)
# Plural-only objects whose WordNet "singular" is another word (glass, pant, scissor).
DEFAULT_KEEP_PLURAL: tuple[str, ...] = (
    "pants", "jeans", "shorts", "trousers", "glasses", "sunglasses", "eyeglasses", "goggles",
    "scissors", "clothes", "stairs", "tongs",
)
# COCO's multi-word category names (things and stuff): kept whole even where the tagger reads the
# modifier as an adjective or verb, or WordNet lacks the compound.
DEFAULT_EXTRA_COMPOUNDS: tuple[str, ...] = (
    "traffic light", "fire hydrant", "stop sign", "parking meter", "sports ball", "baseball bat",
    "baseball glove", "tennis racket", "wine glass", "hot dog", "potted plant", "dining table",
    "cell phone", "teddy bear", "hair drier", "hair dryer",
)


@dataclass(frozen=True)
class NounConfig:
    """How nouns are extracted (the `nouns` section of the mining params)."""

    tagger: str = "nltk-default"  # "nltk-default" | "penn-hmm" | "trained:<path to word/TAG file>"
    nltk_data: str | None = ".ovseg/nltk_data"  # searched first (relative to the working directory)
    stop_nouns: tuple[str, ...] = DEFAULT_STOP_NOUNS
    keep_plural: tuple[str, ...] = DEFAULT_KEEP_PLURAL
    wordnet_compounds: bool = True
    extra_compounds: tuple[str, ...] = DEFAULT_EXTRA_COMPOUNDS
    train_iterations: int = 5  # trained:<path> only
    train_seed: int = 0  # trained:<path> only: NLTK shuffles sentences between iterations

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "NounConfig":
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown noun-extraction option(s) {unknown}; known: {sorted(known)}")
        for name in ("stop_nouns", "keep_plural", "extra_compounds"):
            if name in d:
                d[name] = tuple(d[name])
        return cls(**d)


def use_nltk_data(path: str | Path | None) -> None:
    """Search `path` first for NLTK resources (NLTK reads its data path when a resource is loaded)."""
    if path is None:
        return
    resolved = str(Path(path).resolve())
    if resolved not in nltk.data.path:
        nltk.data.path.insert(0, resolved)


def _data_dir_hint(config: NounConfig) -> Path:
    return Path(config.nltk_data or "~/nltk_data").expanduser()


def _require_wordnet(config: NounConfig) -> None:
    try:
        wordnet.ensure_loaded()
    except LookupError:
        raise DataError(
            _data_dir_hint(config) / "corpora" / "wordnet",
            f"WordNet (used to lemmatise nouns) is not installed; install it offline with "
            f"`{INSTALL_OFFLINE_COMMAND}`",
        ) from None


# ---------------------------------------------------------------------------------------------
# penn-hmm: NLTK's HMM tagger with Penn Treebank statistics from Debian's liblingua-en-tagger-perl
# ---------------------------------------------------------------------------------------------

PENN_HMM_RESOURCE = "taggers/penn_hmm"
# The package's own names for Penn tags that are not just lower case.
_LINGUA_TO_PENN = {"det": "DT", "prps": "PRP$", "wps": "WP$", "ppc": ",", "pp": ".", "pps": ":",
                   "ppl": "``", "ppr": "''", "ppd": "$", "lrb": "-LRB-", "rrb": "-RRB-"}
_SENTENCE_START = "pp"  # the package models a sentence start as following sentence-final punctuation
_TRANSITION_FLOOR = 1e-6  # unseen tag bigrams stay possible
_WORDNET_POS_TAGS = {"n": ("nn", "nns", "nnp", "nnps"), "v": ("vb", "vbd", "vbg", "vbn", "vbp", "vbz"),
                     "a": ("jj", "jjr", "jjs"), "r": ("rb", "rbr", "rbs")}


def _read_counts(path: Path) -> dict[str, dict[str, float]]:
    # BaseLoader keeps every scalar a string: with YAML 1.1 resolution the words "on", "no", "off",
    # "yes" would become booleans and vanish from the lexicon.
    loader = getattr(yaml, "CBaseLoader", yaml.BaseLoader)
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=loader)
        return {str(w): {t: float(n) for t, n in row.items()} for w, row in raw.items()}
    except (yaml.YAMLError, AttributeError, ValueError) as e:
        raise DataError(path, f"not a Lingua::EN::Tagger count table: {e}") from None


def _unknown_word_class(word: str) -> str:
    """The package's classes for words it never saw (see its unknown.yml)."""
    if not re.search(r"[A-Za-z0-9]", word):
        return "-sym-"
    if "-" in word:
        return "-hyp-"
    for suffix, klass in (("ing", "-ing-"), ("ed", "-ed-"), ("ly", "-ly-"), ("tion", "-tion-"), ("s", "-s-")):
        if word.endswith(suffix):
            return klass
    return "-cap-" if word[:1].isupper() else "-unknown-"


class _LexiconEmission(ProbDistI):
    """P(word | tag) for one tag, from the lexicon's counts; NLTK has no distribution with an
    unknown-word model, so this small one is written here."""

    def __init__(self, tag: str, model: "_PennLexicon"):
        self.tag = tag
        self.model = model

    def prob(self, sample: str) -> float:
        return 2.0 ** self.logprob(sample)

    def logprob(self, sample: str) -> float:
        p = self.model.emission(sample, self.tag)
        return math.log2(p) if p > 0 else -1e30

    def max(self) -> str:
        raise NotImplementedError("an open-vocabulary emission has no finite argmax")

    def samples(self) -> list[str]:
        return list(self.model.words)


class _PennLexicon:
    def __init__(self, root: Path):
        self.words = _read_counts(root / "words.yml")
        self.transitions = _read_counts(root / "tags.yml")
        self.unknown = _read_counts(root / "unknown.yml")
        self.tags = sorted(self.transitions)
        self._priors: dict[str, dict[str, float]] = {}
        self.tag_totals = {t: 0.0 for t in self.tags}
        for row in self.words.values():
            for t, n in row.items():
                self.tag_totals[t] = self.tag_totals.get(t, 0.0) + n

    def _known(self, word: str) -> dict[str, float] | None:
        # Lower case first: a caption's capitalised first word is rarely a proper noun ("Men": nnp 3 ...).
        row = self.words.get(word.lower()) or self.words.get(word)
        if row is None and re.fullmatch(r"[0-9][0-9.,]*", word):
            row = self.words["*NUM*"]
        return row

    def _tag_prior(self, word: str) -> dict[str, float]:
        """P(tag | word) from the word's suffix class alone, as the package models unknown words."""
        if word not in self._priors:
            weights = dict(self.unknown[_unknown_word_class(word)])
            allowed = {t for pos, tags in _WORDNET_POS_TAGS.items() if wordnet._morphy(word.lower(), pos) for t in tags}
            if allowed:  # WordNet knows the word: keep only its parts of speech ("snowy" is no noun)
                weights = {t: weights.get(t, 0.0) + 1.0 for t in allowed}
            z = sum(weights.values())
            self._priors[word] = {t: w / z for t, w in weights.items()}
        return self._priors[word]

    def emission(self, word: str, tag: str) -> float:
        total = self.tag_totals.get(tag, 0.0)
        if total <= 0:
            return 0.0
        # The unknown-word model P(t|class(w)) acts as a prior worth one observation, so words seen a
        # few times in the Wall Street Journal ("grazing": nn 2) can still take their other tags.
        # P(w|t) ∝ (count(w,t) + prior(t)) / count(t); a factor common to all tags leaves Viterbi as is.
        row = self._known(word)
        return ((row.get(tag, 0.0) if row else 0.0) + self._tag_prior(word).get(tag, 0.0)) / total

    def _distribution(self, row: Mapping[str, float]) -> DictionaryProbDist:
        smoothed = {t: row.get(t, 0.0) + _TRANSITION_FLOOR for t in self.tags}
        z = sum(smoothed.values())
        return DictionaryProbDist({t: p / z for t, p in smoothed.items()})

    def hmm(self) -> HiddenMarkovModelTagger:
        transitions = DictionaryConditionalProbDist({t: self._distribution(self.transitions[t]) for t in self.tags})
        outputs = {t: _LexiconEmission(t, self) for t in self.tags}
        priors = self._distribution(self.transitions[_SENTENCE_START])
        return HiddenMarkovModelTagger([], self.tags, transitions, outputs, priors)


@functools.lru_cache(maxsize=2)
def _penn_lexicon(root: Path) -> _PennLexicon:
    return _PennLexicon(root)  # ~2 s of YAML parsing: once per process


class PennHmmTagger(TaggerI):
    """NLTK HMM (Viterbi) tagger with Penn Treebank statistics; returns Penn tags."""

    def __init__(self, root: Path):
        self._hmm = _penn_lexicon(root.resolve()).hmm()

    def tag(self, tokens: list[str]) -> list[tuple[str, str]]:
        if not tokens:
            return []
        return [(w, _LINGUA_TO_PENN.get(t, t.upper())) for w, t in self._hmm.tag(list(tokens))]


# ---------------------------------------------------------------------------------------------
# tagger selection
# ---------------------------------------------------------------------------------------------


def read_tagged_sentences(path: str | Path) -> list[list[tuple[str, str]]]:
    """One sentence a line, whitespace-separated ``word/TAG`` tokens."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "POS-tagged training file not found (tagger: trained:<path>)")
    sentences = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        tokens = [str2tuple(tok) for tok in line.split()]
        if any(tag is None for _, tag in tokens):
            raise DataError(path, f"line {lineno}: every token must be word/TAG")
        if tokens:
            sentences.append(tokens)
    if not sentences:
        raise DataError(path, "no tagged sentences")
    return sentences


def train_perceptron(path: str | Path, iterations: int = 5, seed: int = 0) -> PerceptronTagger:
    """NLTK's averaged perceptron trained on a word/TAG file (deterministic for a seed)."""
    sentences = read_tagged_sentences(path)
    tagger = PerceptronTagger(load=False)
    state = random.getstate()  # NLTK shuffles with the global generator; leave it as we found it
    random.seed(seed)
    try:
        tagger.train(sentences, nr_iter=iterations)
    finally:
        random.setstate(state)
    return tagger


def load_tagger(config: NounConfig) -> TaggerI:
    spec = config.tagger
    if spec == "nltk-default":
        try:
            return PerceptronTagger()
        except LookupError:
            target = _data_dir_hint(config)
            raise DataError(
                target / "taggers" / "averaged_perceptron_tagger_eng",
                "NLTK's standard POS tagger is not installed. Install it (needs internet) with "
                f"`python -m nltk.downloader -d {target} averaged_perceptron_tagger_eng`, or use the "
                f"offline Penn Treebank tagger: `{INSTALL_OFFLINE_COMMAND}` and set `tagger: penn-hmm`",
            ) from None
    if spec == "penn-hmm":
        try:
            root = Path(nltk.data.find(f"{PENN_HMM_RESOURCE}/words.yml")).parent
        except LookupError:
            raise DataError(
                _data_dir_hint(config) / PENN_HMM_RESOURCE,
                f"the offline Penn Treebank tagger data is not installed; run `{INSTALL_OFFLINE_COMMAND}`",
            ) from None
        return PennHmmTagger(root)
    if spec.startswith("trained:"):
        return train_perceptron(spec.removeprefix("trained:"), config.train_iterations, config.train_seed)
    raise ValueError(f"unknown tagger {spec!r}: use nltk-default, penn-hmm or trained:<path>")


# ---------------------------------------------------------------------------------------------
# noun extraction
# ---------------------------------------------------------------------------------------------

_WORD = re.compile(r"[a-z]+(?:[-'][a-z]+)*")


class NounExtractor:
    """`NounExtractor(config).nouns(caption)` → unique nouns in caption order."""

    def __init__(self, config: NounConfig | Mapping[str, Any] | None = None):
        self.config = config if isinstance(config, NounConfig) else NounConfig.from_dict(config)
        # resolved now: a DataLoader worker that unpickles this extractor may run in another directory
        self._nltk_data = str(Path(self.config.nltk_data).resolve()) if self.config.nltk_data else None
        use_nltk_data(self._nltk_data)
        _require_wordnet(self.config)
        self.tagger = load_tagger(self.config)
        self.tokenizer = NLTKWordTokenizer()
        self._stop = frozenset(self.config.stop_nouns)
        self._keep_plural = frozenset(self.config.keep_plural)
        self._extra = frozenset(tuple(c.lower().split()) for c in self.config.extra_compounds)
        self._singulars: dict[tuple[str, bool], str] = {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickled in another process (a DataLoader worker): NLTK must search the same data there."""
        self.__dict__.update(state)
        use_nltk_data(self._nltk_data)

    def _singular(self, word: str, plural: bool) -> str:
        key = (word, plural)
        if key not in self._singulars:
            # All of WordNet's analyses (WordNetLemmatizer keeps only the shortest: "men" -> "men")
            analyses = wordnet._morphy(word, wordnet.NOUN)
            if plural or word not in analyses:
                self._singulars[key] = next((a for a in analyses if a != word), word)
            else:  # a singular that is a lemma itself stays ("boss", not the genus "bos")
                self._singulars[key] = word
        return self._singulars[key]

    def lemma(self, word: str, plural: bool) -> str:
        """Singular WordNet form of a lower-case noun; `plural` when the tagger said NNS/NNPS."""
        return word if word in self._keep_plural else self._singular(word, plural)

    def _compound(self, words: Sequence[str], tags: Sequence[str], i: int) -> tuple[str, int] | None:
        """A compound noun starting at token i, as (noun, number of tokens), or None."""
        for length in (3, 2):
            j = i + length
            if j > len(words) or tags[j - 1] not in NOUN_TAGS:
                continue
            parts = list(words[i : j - 1]) + [self._singular(words[j - 1], tags[j - 1] in PLURAL_TAGS)]
            if tuple(parts) in self._extra:
                return " ".join(parts), length
            if self.config.wordnet_compounds and all(t in NOUN_TAGS for t in tags[i:j]):
                found = wordnet.morphy("_".join(words[i:j]), wordnet.NOUN)
                if found:
                    return found.replace("_", " "), length
        return None

    def nouns(self, caption: str) -> list[str]:
        tagged = self.tagger.tag(self.tokenizer.tokenize(caption))
        words = [w.lower() for w, _ in tagged]
        tags = [t for _, t in tagged]
        found: list[str] = []
        i = 0
        while i < len(words):
            compound = self._compound(words, tags, i)
            if compound is not None:
                noun, i = compound[0], i + compound[1]
            elif tags[i] in NOUN_TAGS and _WORD.fullmatch(words[i]) and len(words[i]) > 1:
                noun, i = self.lemma(words[i], tags[i] in PLURAL_TAGS), i + 1
            else:
                i += 1
                continue
            if noun not in self._stop and noun not in found:
                found.append(noun)
        return found

    def nouns_for_image(self, captions: Sequence[str], num_captions: int = 1) -> list[str]:
        """Nouns of the image's first `num_captions` captions (1: the paper's default; 5: Table 2 case 4)."""
        if num_captions < 1:
            raise ValueError(f"num_captions must be >= 1, got {num_captions}")
        found: dict[str, None] = {}  # insertion-ordered set
        for caption in captions[:num_captions]:
            found.update(dict.fromkeys(self.nouns(caption)))
        return list(found)

