#!/usr/bin/env bash
# Set up ovseg-pipeline on a fresh machine that has only Python 3.11: a virtual environment in .venv
# with every dependency (pins in constraints.txt), the project installed editable, and the offline
# NLTK data the noun extractor uses. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")"

PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
"$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || {
  echo "setup.sh: Python 3.11 is required (torch 2.14.1 + torchvision 0.29.1 install from this machine's disk for 3.11)" >&2
  exit 1
}

export DVC_NO_ANALYTICS=1 PIP_DISABLE_PIP_VERSION_CHECK=1
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.ovseg-installed
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  # pip's and setuptools' chatter (build-backend notices, this machine's index warnings) goes to a log that
  # is shown only when the install fails
  log=.venv/pip-install.log
  echo "setup.sh: installing the dependencies into .venv (a few minutes; pip's output: $log)"
  if ! { .venv/bin/python -m pip install -q --upgrade pip &&
         .venv/bin/python -m pip install -q -c constraints.txt -e '.[test]'; } > "$log" 2>&1; then
    cat "$log" >&2
    echo "setup.sh: pip install failed (output above, also in $log)" >&2
    exit 1
  fi
  echo "$want" > "$stamp"
fi
bash scripts/install_nltk_data.sh
echo "setup.sh: environment ready (.venv)"
