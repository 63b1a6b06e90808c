#!/usr/bin/env bash
# Fails if the book's reference chapter names a flag that the module's
# binary does not accept: every `--flag` under a "## moduleNN_name" heading
# must appear in the `--help` of that binary or of one of its subcommands,
# and the common flags in at least one binary. Run after a build
# (BIN_DIR, default target/debug, holds the binaries).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin_dir="${BIN_DIR:-$root/target/debug}"
reference="$root/book/src/reference.md"

# Everything `BIN --help` and `BIN SUB --help` print, for every subcommand.
help_text() {
    local bin="$bin_dir/$1"
    [[ -x "$bin" ]] || { echo "reference: $bin is not built" >&2; return 1; }
    "$bin" --help
    "$bin" --help | awk '/^Commands:/ { on = 1; next } /^$/ { on = 0 } on { print $1 }' |
        grep -v '^help$' | while read -r sub; do "$bin" "$sub" --help; done
}

# The `--flags` of one "## heading" section of the reference.
section_flags() {
    awk -v want="## $1" '/^## / { on = ($0 == want); next } on' "$reference" |
        grep -o -- '--[a-z][a-z0-9-]*' | sort -u
}

status=0
all_help=""
for bin in module00_env module01_baseline module02_kvcache module03_tcp module04_rdma \
    module05_routing module06_dynamo; do
    help="$(help_text "$bin")" || { status=1; continue; }
    all_help+="$help"$'\n'
    for flag in $(section_flags "$bin"); do
        grep -q -- "$flag\b" <<<"$help" || {
            echo "reference: $bin does not accept $flag"
            status=1
        }
    done
done
for flag in $(section_flags "Common flags"); do
    grep -q -- "$flag\b" <<<"$all_help" || {
        echo "reference: no binary accepts the common flag $flag"
        status=1
    }
done
[[ $status == 0 ]] && echo "reference: every flag it names exists"
exit $status
