#!/usr/bin/env bash
# Try the newest releases of every dependency: a scratch virtual environment gets the latest torch and the
# latest release of each dependency in pyproject.toml, the test extra included (their version bounds and the
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
# Package names only: no bounds, no pins.
names=$("$venv/bin/python" -c "import re, tomllib
project = tomllib.load(open('pyproject.toml', 'rb'))['project']
print(' '.join(re.split(r'[<>=!~;\[ ]', d)[0] for d in project['dependencies'] + project['optional-dependencies']['test']))")
# shellcheck disable=SC2086
"${pip[@]}" install --quiet --upgrade $names
"${pip[@]}" install --quiet --no-deps -e .
echo "Installed (newest releases):"
"${pip[@]}" list --format=freeze | grep -iE "^($(echo $names | tr ' ' '|' | sed 's/[-_]/[-_]/g')|torch)==" | sed 's/^/  /'
status=0
"$venv/bin/python" -m pytest -q || status=$?
if [ "$status" -eq 0 ] && [ "${1:-}" = "--write-lock" ]; then
    { sed -n '/^#/p' constraints.txt; "${pip[@]}" freeze | grep -viE "^(torch|pip)==|^-e |^rwkv-chat"; } > constraints.txt.new
    mv constraints.txt.new constraints.txt
    echo "constraints.txt rewritten from the newest releases: review git diff, raise the bounds in the requirements"
fi
exit "$status"
