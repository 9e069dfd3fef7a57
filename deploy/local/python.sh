#!/usr/bin/env bash
# Creates the project's virtualenv with Python 3.11, installing venv support
# from the distribution's packages when it is missing (Debian/Ubuntu).
set -euo pipefail
python=${1:-python3}
venv=${2:-.venv}

version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true)
if [ "$version" != "3.11" ]; then
  if command -v python3.11 >/dev/null; then
    python=python3.11
  else
    echo "moneta needs Python 3.11 (found: ${version:-none}); install python3.11" >&2
    exit 1
  fi
fi

if [ -x "$venv/bin/python" ]; then
  exit 0
fi
if ! "$python" -m venv "$venv" 2>/dev/null; then
  rm -rf "$venv"
  if command -v apt-get >/dev/null; then
    echo "installing python3-venv from the distribution's packages" >&2
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq python3-venv python3-dev build-essential
    "$python" -m venv "$venv"
  else
    echo "cannot create a virtualenv: install Python's venv module" >&2
    exit 1
  fi
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade "pip==26.3"
