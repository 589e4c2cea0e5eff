#!/usr/bin/env bash
# Installs the Debian packages that are missing, and only those:
#   always            what the synthetic corpus needs: espeak-ng, flite, festival and three festival voices, sox;
#                     and pocketsphinx-testdata, CMU's few real recordings (tests of the phones reader,
#                     scripts/demo_on_real_speech.sh);
#   --build-tools     what building fairseq-fixed (`make oracle-env`) needs: a C/C++ compiler and the headers
#                     (Python.h) of the interpreter given with --python (default: python3).
# Needs root or sudo; otherwise says what to run and fails.
set -euo pipefail

build_tools=0
python=python3
while [ $# -gt 0 ]; do
    case "$1" in
        --build-tools) build_tools=1 ;;
        --python) python="$2"; shift ;;
        *) echo "usage: $0 [--build-tools] [--python PYTHON]" >&2; exit 2 ;;
    esac
    shift
done

need=()
command -v espeak-ng >/dev/null || need+=(espeak-ng)
command -v flite >/dev/null || need+=(flite)
command -v festival >/dev/null || need+=(festival)
[ -d /usr/share/festival/voices/english/kal_diphone ] || need+=(festvox-kallpc16k)
[ -d /usr/share/festival/voices/english/ked_diphone ] || need+=(festvox-kdlpc16k)
[ -d /usr/share/festival/voices/us/cmu_us_slt_arctic_hts ] || need+=(festvox-us-slt-hts)
command -v sox >/dev/null || need+=(sox)
[ -f /usr/share/pocketsphinx/test/data/goforward.raw ] || need+=(pocketsphinx-testdata)

if [ "$build_tools" -eq 1 ]; then
    { command -v g++ >/dev/null || command -v c++ >/dev/null; } && command -v gcc >/dev/null \
        || need+=(build-essential)
    # sysconfig names the headers' directory of the interpreter (a virtualenv's points to its base install).
    if ! include=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])'); then
        echo "error: cannot run $python to find its headers" >&2
        exit 1
    fi
    if [ ! -f "$include/Python.h" ]; then
        prefix=$("$python" -c 'import sys; print(sys.base_prefix)')
        version=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
        if [ "$prefix" = /usr ] && command -v apt-get >/dev/null; then
            # Debian's python3-dev has the headers of the default python3; another system python has its own.
            if [ "$(/usr/bin/python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")' \
                    2>/dev/null)" = "$version" ]; then
                need+=(python3-dev)
            else
                need+=("python$version-dev")
            fi
        else
            echo "error: $python ($prefix) has no Python.h in $include, and fairseq-fixed compiles against it." >&2
            echo "Reinstall that Python with its headers (pyenv and python.org builds include them; a distribution's" >&2
            echo "python needs its -dev package), or build with another one: make oracle-env PYTHON=/path/to/python3" >&2
            exit 1
        fi
    fi
fi
[ ${#need[@]} -eq 0 ] && exit 0

echo "installing system packages: ${need[*]}"
if [ "$(id -u)" -eq 0 ]; then
    sudo=()
elif command -v sudo >/dev/null; then
    sudo=(sudo)
else
    echo "error: missing ${need[*]}; as root, run: apt-get update && apt-get install -y ${need[*]}" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null; then
    echo "error: missing ${need[*]} (Debian names) and no apt-get here; install them with your package manager" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq "${need[@]}" >/dev/null
