#!/usr/bin/env bash
# Fails if a {{#include path:anchor}} in the book names a file or an anchor
# that does not exist (mdbook itself only warns and includes nothing), or if
# an internal link or image points at a file that is not there.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../book/src"
status=0
while IFS= read -r include; do
    spec="${include#\{\{#include }"
    spec="${spec%\}\}}"
    path="${spec%%:*}"
    anchor=""
    [[ "$spec" == *:* ]] && anchor="${spec#*:}"
    if [[ ! -f "$path" ]]; then
        echo "book: missing file $path"
        status=1
    elif [[ -n "$anchor" && ! "$anchor" =~ ^[0-9] ]] && ! grep -q "ANCHOR: $anchor\$" "$path"; then
        echo "book: no anchor '$anchor' in $path"
        status=1
    fi
done < <(grep -oh '{{#include [^}]*}}' ./*.md)
# Internal links and images: [text](path) or ![alt](path), not URLs, not
# anchors alone; the #fragment is dropped. Code blocks are skipped.
while IFS=: read -r file target; do
    path="${target%%#*}"
    [[ -z "$path" || "$path" == *://* || "$path" == mailto:* ]] && continue
    if [[ ! -e "$path" ]]; then
        echo "book: $file links to missing $path"
        status=1
    fi
done < <(for f in ./*.md; do
    awk '/^```/ { code = !code; next } !code' "$f" |
        grep -o '\]([^) ]*)' | sed -e 's/^](//' -e 's/)$//' -e "s|^|$f:|" || true
done)
exit $status
