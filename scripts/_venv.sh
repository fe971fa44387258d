# Sourced by scripts/demo and scripts/test: create .venv and install the given extras.
# pip's output goes to .venv/install.log and is shown only when the install fails.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python3 -m venv .venv
if ! { .venv/bin/python -m pip install --upgrade pip \
       && .venv/bin/python -m pip install -e ".[$1]"; } > .venv/install.log 2>&1; then
    cat .venv/install.log >&2
    echo "error: installing thread_store[$1] failed (log above, also in .venv/install.log)" >&2
    exit 1
fi
