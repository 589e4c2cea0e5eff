#!/usr/bin/env bash
# Installs the Debian packages the synthetic corpus needs (espeak-ng, flite, festival and two festival voices),
# only when one of them is missing. Needs root or sudo; otherwise says what to install and fails.
set -euo pipefail

need=()
command -v espeak-ng >/dev/null || need+=(espeak-ng)
command -v flite >/dev/null || need+=(flite)
command -v festival >/dev/null || need+=(festival)
[ -d /usr/share/festival/voices/english/kal_diphone ] || need+=(festvox-kallpc16k)
[ -d /usr/share/festival/voices/us/cmu_us_slt_arctic_hts ] || need+=(festvox-us-slt-hts)
command -v sox >/dev/null || need+=(sox)
[ ${#need[@]} -eq 0 ] && exit 0

echo "installing system packages: ${need[*]}"
if [ "$(id -u)" -eq 0 ]; then
    sudo=()
elif command -v sudo >/dev/null; then
    sudo=(sudo)
else
    echo "error: missing ${need[*]}; install them with: apt-get install -y ${need[*]}" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null; then
    echo "error: missing ${need[*]} and no apt-get here; install them with your package manager" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq "${need[@]}" >/dev/null
