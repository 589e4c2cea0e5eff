#!/usr/bin/env bash
# Fluent Speech Commands (action|object|location) -> OUT/{train,dev,test}.tsv + .labels + summary.json.
# A thin wrapper of `speechprompt prepare-dataset fluent_commands`; the logic is in speechprompt/data_prep/datasets/.
set -euo pipefail
usage="Usage: $0 ROOT OUT [KEY=VALUE ...]  (layout and options: speechprompt prepare-dataset fluent_commands --help)"
case "${1:-}" in -h|--help) echo "${usage}"; exit 0 ;; esac
[ $# -ge 2 ] || { echo "${usage}" >&2; exit 2; }
exec speechprompt prepare-dataset fluent_commands --root "$1" --out "$2" "${@:3}"
