#!/usr/bin/env bash
# Libri-light limited-resource ASR (10 min / 1 h / 10 h) with LibriSpeech dev/test -> OUT/<split>.tsv + .labels + summary.json.
# A thin wrapper of `speechprompt prepare-dataset librilight`; the logic is in speechprompt/data_prep/datasets/.
set -euo pipefail
usage="Usage: $0 ROOT OUT [KEY=VALUE ...]  (layout and options: speechprompt prepare-dataset librilight --help)"
case "${1:-}" in -h|--help) echo "${usage}"; exit 0 ;; esac
[ $# -ge 2 ] || { echo "${usage}" >&2; exit 2; }
exec speechprompt prepare-dataset librilight --root "$1" --out "$2" "${@:3}"
