"""Noun extraction on real English captions with the offline Penn Treebank HMM tagger and WordNet
(installed by scripts/install_nltk_data.sh, which setup.sh runs), and on a trained tagger."""
import os
import subprocess
import sys
from pathlib import Path

import nltk
import pytest

from ovseg_core.errors import DataError
from ovseg_core.nouns import NounConfig, NounExtractor, load_tagger, train_perceptron

ROOT = Path(__file__).resolve().parents[1]
NLTK_DATA = ROOT / ".ovseg" / "nltk_data"

# COCO-style captions and their nouns, checked by hand: singular lemmas, stop-nouns (top, side,
# group, couple, bunch, picture, photo, close) removed, WordNet noun+noun compounds and COCO's
# multi-word category names kept whole, adjective+noun reduced to the noun.
CAPTIONS = [
    ("A man riding a wave on top of a surfboard.", ["man", "wave", "surfboard"]),
    ("A fire hydrant sitting on the side of a street.", ["fire hydrant", "street"]),
    ("Two dogs playing with a frisbee in the grass.", ["dog", "frisbee", "grass"]),
    ("A plate of food with broccoli and a hot dog.", ["plate", "food", "broccoli", "hot dog"]),
    ("A group of people standing around a kitchen counter.", ["people", "kitchen", "counter"]),
    ("Several giraffes are standing in a field near trees.", ["giraffe", "field", "tree"]),
    ("A woman holding an umbrella walks down a city street.", ["woman", "umbrella", "city", "street"]),
    ("A bathroom with a toilet, sink and mirror.", ["bathroom", "toilet", "sink", "mirror"]),
    ("A couple of elephants walking through a river.", ["elephant", "river"]),
    ("A black and white photo of a train station.", ["train station"]),
    ("Two men play tennis on a clay court.", ["man", "tennis", "clay", "court"]),
    ("A close up of a sandwich with lettuce and tomatoes.", ["sandwich", "lettuce", "tomato"]),
    ("A picture of a living room with a couch and a television.", ["living room", "couch", "television"]),
    ("A bunch of bananas hanging from a tree.", ["banana", "tree"]),
    ("People are skiing down a snowy mountain slope.", ["people", "mountain", "slope"]),
    ("A stop sign on the corner of a street with cars.", ["stop sign", "street", "car"]),
    ("Men with their teeth showing are next to the traffic lights.", ["man", "tooth", "traffic light"]),
    ("A man wearing glasses and a tank top sits on a bench.", ["man", "glasses", "tank top", "bench"]),
    ("A young man in a yellow jacket stands near a white house.", ["man", "jacket", "house"]),
    ("Children flying kites on a windy beach.", ["child", "kite", "beach"]),
    ("A pizza with pepperoni and olives on a wooden table.", ["pizza", "pepperoni", "olive", "table"]),
    ("A baseball player swinging a bat at a ball.", ["baseball player", "bat", "ball"]),
]


@pytest.fixture(scope="module")
def extractor() -> NounExtractor:
    return NounExtractor({"tagger": "penn-hmm", "nltk_data": str(NLTK_DATA)})


@pytest.mark.parametrize("caption,expected", CAPTIONS, ids=[c for c, _ in CAPTIONS])
def test_caption_nouns(extractor, caption, expected):
    assert extractor.nouns(caption) == expected


def test_tagger_reads_yaml_boolean_words_as_words(extractor):
    # "on"/"off"/"no" are YAML 1.1 booleans: read naively they drop out of the lexicon and "on" turns noun
    assert extractor.tagger.tag(["The", "cat", "is", "on", "the", "mat"])[3] == ("on", "IN")
    assert [t for _, t in extractor.tagger.tag(["A", "man", "riding", "a", "wave"])] == ["DT", "NN", "VBG", "DT", "NN"]


def test_wordnet_lexnames_written_from_the_man_page(extractor):
    from nltk.corpus import wordnet

    assert wordnet.synsets("giraffe")[0].lexname() == "noun.animal"
    assert wordnet.synsets("surfboard", "n")[0].lexname() == "noun.artifact"


def test_nouns_for_image_uses_first_caption_by_default(extractor):
    captions = ["A cat on a couch.", "A kitten on a sofa next to a pillow.", "A cat and a dog."]
    assert extractor.nouns_for_image(captions) == ["cat", "couch"]
    assert extractor.nouns_for_image(captions, num_captions=5) == ["cat", "couch", "kitten", "sofa", "pillow", "dog"]
    with pytest.raises(ValueError):
        extractor.nouns_for_image(captions, num_captions=0)


def test_stop_nouns_are_configurable():
    caption = "A picture of a cat on the side of a street."
    default = NounExtractor({"tagger": "penn-hmm", "nltk_data": str(NLTK_DATA)})
    none = NounExtractor({"tagger": "penn-hmm", "nltk_data": str(NLTK_DATA), "stop_nouns": []})
    custom = NounExtractor({"tagger": "penn-hmm", "nltk_data": str(NLTK_DATA), "stop_nouns": ["street"]})
    assert default.nouns(caption) == ["cat", "street"]
    assert none.nouns(caption) == ["picture", "cat", "side", "street"]
    assert custom.nouns(caption) == ["picture", "cat", "side"]


def test_compound_options():
    base = {"tagger": "penn-hmm", "nltk_data": str(NLTK_DATA)}
    caption = "A fire hydrant next to a hot dog stand and a tennis racket."
    assert NounExtractor(base).nouns(caption) == ["fire hydrant", "hot dog", "stand", "tennis racket"]
    no_wordnet = NounExtractor({**base, "wordnet_compounds": False, "extra_compounds": ["hot dog"]})
    assert no_wordnet.nouns(caption) == ["fire", "hydrant", "hot dog", "stand", "tennis", "racket"]
    no_extra = NounExtractor({**base, "extra_compounds": []})
    assert no_extra.nouns(caption) == ["fire hydrant", "dog", "stand", "tennis racket"]


def test_plural_only_nouns_keep_their_form():
    base = {"tagger": "penn-hmm", "nltk_data": str(NLTK_DATA)}
    caption = "A woman with sunglasses and scissors."
    assert NounExtractor(base).nouns(caption) == ["woman", "sunglasses", "scissors"]
    assert NounExtractor({**base, "keep_plural": []}).nouns(caption) == ["woman", "sunglass", "scissors"]
    # a compound's head is still singular; a singular that is a lemma itself stays ("boss", not "bos")
    assert NounExtractor(base).nouns("Two wine glasses next to his glasses and his boss.") == [
        "wine glass", "glasses", "boss"]


def test_unknown_options_are_rejected():
    with pytest.raises(ValueError, match="stopnouns"):
        NounConfig.from_dict({"stopnouns": []})
    with pytest.raises(ValueError, match="unknown tagger"):
        load_tagger(NounConfig(tagger="spacy"))


# --- a tagger trained on a word/TAG file (the embedded world's path) ---------------------------

COLOURS = ["red", "blue", "green", "yellow"]
THINGS = [("cube", "cubes"), ("ball", "balls"), ("star", "stars"), ("ring", "rings")]
STUFF = ["grass", "sand", "water"]


def _tagged_sentence(i: int) -> str:
    c1, c2 = COLOURS[i % 4], COLOURS[(i // 4) % 4]
    (t1, t1s), (t2, _) = THINGS[i % 4], THINGS[(i // 3) % 4]
    stuff = STUFF[i % 3]
    if i % 2:
        return f"a/DT {c1}/JJ {t1}/NN next/JJ to/TO a/DT {c2}/JJ {t2}/NN on/IN {stuff}/NN"
    return f"two/CD {c1}/JJ {t1s}/NNS lie/VBP on/IN the/DT {stuff}/NN near/IN a/DT {t2}/NN"


@pytest.fixture
def tagged_file(tmp_path) -> Path:
    path = tmp_path / "pos_tagged_captions.txt"
    path.write_text("\n".join(_tagged_sentence(i) for i in range(60)) + "\n")
    return path


def test_trained_tagger_extracts_world_nouns(tagged_file):
    ex = NounExtractor({"tagger": f"trained:{tagged_file}", "nltk_data": str(NLTK_DATA)})
    assert ex.nouns("two green rings lie on the water near a ball") == ["ring", "water", "ball"]
    assert ex.nouns("a yellow star next to a red cube on sand") == ["star", "cube", "sand"]


def test_trained_tagger_is_deterministic(tagged_file):
    sentence = "two red balls lie on the grass near a star".split()
    a = train_perceptron(tagged_file, iterations=3, seed=1)
    b = train_perceptron(tagged_file, iterations=3, seed=1)
    assert a.tag(sentence) == b.tag(sentence)
    assert a.model.weights == b.model.weights


def test_trained_tagger_rejects_bad_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        train_perceptron(tmp_path / "missing.txt")
    bad = tmp_path / "bad.txt"
    bad.write_text("a/DT cat/NN\nthe dog/NN\n")
    with pytest.raises(DataError, match="line 2"):
        train_perceptron(bad)


# --- missing data stops with the command that installs it ------------------------------------


def test_missing_standard_tagger_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    with pytest.raises(DataError) as err:
        load_tagger(NounConfig(tagger="nltk-default", nltk_data=str(tmp_path)))
    message = str(err.value)
    assert f"python -m nltk.downloader -d {tmp_path} averaged_perceptron_tagger_eng" in message
    assert "bash scripts/install_nltk_data.sh" in message


def test_missing_penn_data_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    with pytest.raises(DataError, match="bash scripts/install_nltk_data.sh"):
        load_tagger(NounConfig(tagger="penn-hmm", nltk_data=str(tmp_path)))


def test_missing_wordnet_names_the_install_command(tmp_path):
    # a fresh interpreter: WordNet, once loaded, stays loaded in this one
    code = (
        "from ovseg_core.nouns import NounExtractor\n"
        f"NounExtractor({{'tagger': 'penn-hmm', 'nltk_data': {str(tmp_path)!r}}})\n"
    )
    env = {**os.environ, "HOME": str(tmp_path), "NLTK_DATA": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0
    assert "DataError" in result.stderr
    assert "WordNet" in result.stderr and "bash scripts/install_nltk_data.sh" in result.stderr
