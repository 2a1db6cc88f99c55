#!/usr/bin/env bash
# Install the offline NLTK data the noun extractor uses into an NLTK_DATA directory (idempotent).
#
# NLTK's own downloader needs the internet, which these machines do not have. Debian's archive
# (reachable here) ships two real resources that NLTK can read:
#   wordnet-base + wordnet-sense-index -> corpora/wordnet      (WordNet 3.0: WordNetLemmatizer, morphy,
#                                                                compound lookup)
#   liblingua-en-tagger-perl           -> taggers/penn_hmm     (Penn Treebank word/tag counts and tag
#                                                                transitions; read by ovseg_core.nouns
#                                                                into NLTK's HiddenMarkovModelTagger)
# The .debs are downloaded and unpacked (not installed), so no Perl modules land on the system and
# dpkg's path excludes (man pages in slim images) do not matter. Debian ships no `lexnames` file,
# which NLTK's WordNet reader requires: it is written from the table in the lexnames(5WN) man page.
#
# usage: scripts/install_nltk_data.sh [DEST]      (default DEST: <repo>/.ovseg/nltk_data)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$(realpath -m "${1:-$ROOT/.ovseg/nltk_data}")"
PACKAGES=(wordnet-base wordnet-sense-index liblingua-en-tagger-perl)
MARKER="$DEST/ovseg_offline_sources.txt"  # written last: its presence marks a complete install

wordnet_files=(data.noun index.noun noun.exc data.verb index.verb verb.exc data.adj index.adj adj.exc
               data.adv index.adv adv.exc index.sense cntlist lexnames)
tagger_files=(words.yml tags.yml unknown.yml)

complete() {
  [[ -f "$MARKER" ]] || return 1
  local f
  for f in "${wordnet_files[@]}"; do [[ -s "$DEST/corpora/wordnet/$f" ]] || return 1; done
  for f in "${tagger_files[@]}"; do [[ -s "$DEST/taggers/penn_hmm/$f" ]] || return 1; done
}

if complete; then
  echo "NLTK data already installed in $DEST"
  exit 0
fi

if ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then
  echo "install_nltk_data.sh: needs Debian's apt-get and dpkg-deb. Elsewhere, with internet, install NLTK's" \
       "own data instead: python -m nltk.downloader -d $DEST wordnet averaged_perceptron_tagger_eng" \
       "(and use nouns tagger nltk-default)" >&2
  exit 1
fi

as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

# apt-get download needs package lists; fetch them once if this machine has none for our packages.
if ! apt-cache show "${PACKAGES[@]}" >/dev/null 2>&1; then
  as_root apt-get update -qq
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
chmod a+rwx "$WORK"  # apt's unprivileged _apt user writes the downloads
download() { (cd "$WORK" && apt-get download -qq "${PACKAGES[@]}"); }
download || { as_root apt-get update -qq && download; }  # stale lists: the archive moved on
for deb in "$WORK"/*.deb; do dpkg-deb -x "$deb" "$WORK/root"; done

# Build our two directories in a staging tree inside DEST, then move each into place; other NLTK data
# already in DEST (e.g. NLTK's standard tagger, fetched where there is internet) is left alone.
mkdir -p "$DEST"
rm -f "$MARKER"
STAGE="$(mktemp -d "$DEST/.staging.XXXXXX")"
trap 'rm -rf "$WORK" "$STAGE"' EXIT
mkdir -p "$STAGE/corpora/wordnet" "$STAGE/taggers/penn_hmm"
cp "$WORK"/root/usr/share/wordnet/* "$STAGE/corpora/wordnet/"

# lexnames: "NN<TAB>name<TAB>category" with category 1 noun, 2 verb, 3 adjective, 4 adverb (lexnames(5WN)).
zcat "$WORK/root/usr/share/man/man5/lexnames.5WN.gz" | awk -F'\t' '
  /^[0-9][0-9]\t/ {
    split($2, parts, "."); name = $2; gsub(/[ \t]+$/, "", name)
    cat = (parts[1] == "noun") ? 1 : (parts[1] == "verb") ? 2 : (parts[1] == "adj") ? 3 : 4
    printf "%s\t%s\t%d\n", $1, name, cat
  }' > "$STAGE/corpora/wordnet/lexnames"
rows=$(wc -l < "$STAGE/corpora/wordnet/lexnames")
if [[ "$rows" -ne 45 ]]; then
  echo "error: expected 45 lexicographer files in lexnames(5WN), parsed $rows" >&2
  exit 1
fi

for f in "${tagger_files[@]}"; do
  cp "$WORK/root/usr/share/perl5/Lingua/EN/Tagger/$f" "$STAGE/taggers/penn_hmm/"
done

chmod -R a+rX "$STAGE"
for sub in corpora/wordnet taggers/penn_hmm; do
  mkdir -p "$DEST/$(dirname "$sub")"
  rm -rf "$DEST/$sub"
  mv "$STAGE/$sub" "$DEST/$sub"
done
{
  echo "Offline NLTK data for ovseg_core.nouns, unpacked from Debian packages by scripts/install_nltk_data.sh"
  for deb in "$WORK"/*.deb; do
    echo "$(dpkg-deb -f "$deb" Package) $(dpkg-deb -f "$deb" Version) sha256:$(sha256sum "$deb" | cut -d' ' -f1)"
  done
} > "$MARKER.tmp"
mv "$MARKER.tmp" "$MARKER"
echo "NLTK data installed in $DEST:"
cat "$MARKER"
