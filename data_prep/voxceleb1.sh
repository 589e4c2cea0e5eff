#!/usr/bin/env bash
# VoxCeleb1 speaker identification (SUPERB SID, iden_split.txt) -> OUT/<split>.tsv + .labels + summary.json.
# A thin wrapper of `speechprompt prepare-dataset voxceleb1`; the logic is in speechprompt/data_prep/datasets/.
set -euo pipefail
usage="Usage: $0 ROOT OUT [KEY=VALUE ...]  (layout and options: speechprompt prepare-dataset voxceleb1 --help)"
case "${1:-}" in -h|--help) echo "${usage}"; exit 0 ;; esac
[ $# -ge 2 ] || { echo "${usage}" >&2; exit 2; }
exec speechprompt prepare-dataset voxceleb1 --root "$1" --out "$2" "${@:3}"
