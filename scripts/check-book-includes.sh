#!/usr/bin/env bash
# Fails if a {{#include path:anchor}} in the book names a file or an anchor
# that does not exist (mdbook itself only warns and includes nothing).
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
exit $status
