# Sourced by scripts/demo and scripts/test: make .venv hold thread_store with the given extras.
#
# The first run creates .venv and installs (a minute or two), and says so. Later runs skip
# the install while pyproject.toml, the extras and the Python are unchanged (a stamp file
# records them). An environment built by another Python, or one that no longer runs, is
# recreated, with a line saying why. pip's output goes to .venv/install.log and is shown
# only when the install fails.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

_extras=$1
_python=${PYTHON:-python3}
_want=$("$_python" -c 'import sys; print(sys.version.split()[0], sys.base_prefix)')
_stamp=".venv/.thread_store-installed-${_extras//,/-}"
_key="$_want $(sha256sum pyproject.toml | cut -d' ' -f1)"

if [ -d .venv ]; then
    _have=$(.venv/bin/python -c 'import sys; print(sys.version.split()[0], sys.base_prefix)' \
            2>/dev/null || true)
    if [ -z "$_have" ]; then
        echo "scripts: .venv is broken (its python does not run); recreating it" >&2
        rm -rf .venv
    elif [ "$_have" != "$_want" ]; then
        echo "scripts: .venv was built by another Python ($_have); recreating it for $_want" >&2
        rm -rf .venv
    fi
fi
if [ ! -d .venv ]; then
    echo "scripts: creating .venv with $_python ($_want)" >&2
    "$_python" -m venv .venv
fi
if [ "$(cat "$_stamp" 2>/dev/null || true)" != "$_key" ]; then
    echo "scripts: installing thread_store[$_extras] into .venv (the first run takes a minute or two)" >&2
    if ! { .venv/bin/python -m pip install --upgrade pip \
           && .venv/bin/python -m pip install -e ".[$_extras]"; } > .venv/install.log 2>&1; then
        cat .venv/install.log >&2
        echo "error: installing thread_store[$_extras] failed (log above, also in .venv/install.log)" >&2
        exit 1
    fi
    echo "$_key" > "$_stamp"
fi
