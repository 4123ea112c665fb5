#!/usr/bin/env bash
# Try the newest releases of every dependency: a scratch virtual environment gets the latest torch and the
# latest release of each package in requirements.txt and requirements-test.txt (their version bounds and the
# constraints.txt lock ignored), then runs the README's test command there.
#
#   tools/try_latest_releases.sh               # prints what it installed and the test summary
#   tools/try_latest_releases.sh --write-lock  # and, if the tests pass, rewrites constraints.txt from it
#
# VENV (default: a new temporary folder) and TORCH (default: torch, i.e. the newest release pip may take here)
# can be set. Nothing outside the scratch environment changes, unless --write-lock is given and the tests pass.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-$(mktemp -d)/venv}
python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip)
"${pip[@]}" install --quiet --upgrade pip
"${pip[@]}" install --quiet --upgrade "${TORCH:-torch}"
# Package names only: no bounds, no pins, no -c lines.
names=$(sed -e 's/#.*//' -e '/^\s*-/d' -e 's/[<>=!~;[ ].*//' requirements.txt requirements-test.txt | grep -v '^$')
# shellcheck disable=SC2086
"${pip[@]}" install --quiet --upgrade $names
echo "Installed (newest releases):"
"${pip[@]}" list --format=freeze | grep -iE "^($(echo $names | tr ' ' '|')|torch)==" | sed 's/^/  /'
status=0
"$venv/bin/python" -m pytest -q || status=$?
if [ "$status" -eq 0 ] && [ "${1:-}" = "--write-lock" ]; then
    { sed -n '/^#/p' constraints.txt; "${pip[@]}" freeze | grep -viE "^(torch|pip)=="; } > constraints.txt.new
    mv constraints.txt.new constraints.txt
    echo "constraints.txt rewritten from the newest releases: review git diff, raise the bounds in the requirements"
fi
exit "$status"
