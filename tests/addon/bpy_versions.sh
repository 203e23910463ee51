#!/usr/bin/env bash
# The add-on's register/unregister test and the file collection (tests/addon/bpy_check.py) on
# newer Blenders than CI's, through the `bpy` wheels from PyPI (Blender as a Python module;
# Python 3.11 only). Run on demand, not in CI:
#
#     tests/addon/bpy_versions.sh [VERSION...]
#
# VERSION: a bpy version on PyPI (4.5.15, 5.0.1, ...); by default the newest 4.5.x (the LTS) and
# the newest 5.x there. Each version gets a virtual environment in
# ${BLENDNET_BPY_CACHE:-$HOME/.cache/blendnet/bpy}/VERSION with bpy installed (about 500 MB
# each), reused while it imports bpy of that version. BLENDNET_BPY_PYTHON: the Python 3.11
# that makes them (default: python3.11, else python3 when it is 3.11). Each check's output is
# also in .../VERSION.log. Ends with a table; the exit status is non-zero if any version failed.

set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
check="$here/bpy_check.py"
addon=$(cd "$here/../../addon/blendnet" && pwd)
cache=${BLENDNET_BPY_CACHE:-$HOME/.cache/blendnet/bpy}

usage() {
    sed -n '2,13s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
}

die() {
    echo "bpy_versions.sh: $*" >&2
    exit 2
}

is_python311() {
    "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null
}

find_python() {
    local candidate
    for candidate in ${BLENDNET_BPY_PYTHON:-} python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1 && is_python311 "$candidate"; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

# Every bpy version on PyPI, one a line, as pip sees them.
available_versions() {
    local listing
    if listing=$("$python" -m pip index versions bpy --disable-pip-version-check 2>/dev/null) \
        && grep -q '^Available versions:' <<<"$listing"; then
        sed -n 's/^Available versions: //p' <<<"$listing" | tr ',' '\n' | tr -d ' '
        return 0
    fi
    # Older pips have no `index`: the error of an install of no version lists them.
    listing=$("$python" -m pip download --no-deps --disable-pip-version-check \
        -d "$(mktemp -d)" 'bpy==' 2>&1 || true)
    sed -n 's/.*(from versions: \([^)]*\)).*/\1/p' <<<"$listing" | tr ',' '\n' | tr -d ' '
}

# The newest version matching a prefix ("4.5.", "5."), final releases only.
newest() {
    grep -E "^${1//./\\.}[0-9.]*$" | sort -V | tail -n 1
}

has_bpy() {
    local venv=$1 version=$2
    [[ -x "$venv/bin/python" ]] || return 1
    "$venv/bin/python" - "$version" >/dev/null 2>&1 <<'EOF'
import importlib.metadata
import sys

if importlib.metadata.version("bpy") != sys.argv[1]:
    sys.exit(1)
import bpy  # noqa: E402,F401  (it imports, too)
EOF
}

# Makes (or reuses) the venv of a version; its python on stdout, the rest on stderr.
prepare() {
    local version=$1 venv="$cache/$1"
    if has_bpy "$venv" "$version"; then
        echo "bpy $version: reusing $venv" >&2
    else
        echo "bpy $version: installing into $venv (about 500 MB)" >&2
        if [[ ! -x "$venv/bin/python" ]]; then
            rm -rf "$venv"
            "$python" -m venv "$venv" >&2 || return 1
        fi
        "$venv/bin/python" -m pip install --disable-pip-version-check "bpy==$version" >&2 \
            || return 1
        if ! has_bpy "$venv" "$version"; then
            echo "bpy $version does not import in $venv" >&2
            return 1
        fi
    fi
    echo "$venv/bin/python"
}

# RESULT line of a part in a check's log: PASS, FAIL, or what happened instead.
result() {
    local part=$1 log=$2 rc=$3 found
    found=$(sed -n "s/^RESULT $part //p" "$log" | tail -n 1)
    if [[ -n "$found" ]]; then
        echo "$found"
    else
        echo "no result (exit $rc)"
    fi
}

if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    usage
    exit 0
fi

python=$(find_python) || die "no Python 3.11 found (bpy wheels need it): set BLENDNET_BPY_PYTHON"
mkdir -p "$cache"

versions=("$@")
if [[ ${#versions[@]} -eq 0 ]]; then
    all=$(available_versions)
    [[ -n "$all" ]] || die "cannot list the bpy versions on PyPI: name the versions to test"
    for prefix in 4.5. 5.; do
        latest=$(newest "$prefix" <<<"$all" || true)
        [[ -n "$latest" ]] || die "no bpy ${prefix}x on PyPI"
        versions+=("$latest")
    done
    echo "Newest bpy versions on PyPI: ${versions[*]}"
fi

rows=()
failed=0
for version in "${versions[@]}"; do
    echo
    echo "=== bpy $version"
    log="$cache/$version.log"
    if ! venv_python=$(prepare "$version"); then
        rows+=("$version|install failed|install failed")
        failed=1
        continue
    fi
    set +e
    "$venv_python" "$check" "$addon" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    set -e
    register=$(result register "$log" "$rc")
    collect=$(result collect "$log" "$rc")
    if [[ $rc -ne 0 || $register != PASS || $collect != PASS ]]; then
        failed=1
    fi
    rows+=("$version|$register|$collect")
done

echo
printf '%-10s  %-20s  %s\n' "bpy" "register test" "collection"
printf '%-10s  %-20s  %s\n' "----------" "--------------------" "--------------------"
for row in "${rows[@]}"; do
    IFS='|' read -r version register collect <<<"$row"
    printf '%-10s  %-20s  %s\n' "$version" "$register" "$collect"
done
exit "$failed"
