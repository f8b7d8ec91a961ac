#!/usr/bin/env bash
# Create .venv (first run) and install lcpn with its test tools at the tested versions.
# Later runs reuse it, and reinstall only when setup.cfg or requirements.txt changed.
# Source it or run it; it prints the path of the environment's Python on its last line.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${LCPN_VENV:-$repo/.venv}
python=${PYTHON:-python3}
stamp=$venv/.lcpn-installed
want=$(cat "$repo/setup.cfg" "$repo/requirements.txt" | sha256sum | cut -d' ' -f1)

if [ ! -x "$venv/bin/python" ]; then
  echo "Creating the virtual environment in $venv ..." >&2
  "$python" -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "Installing lcpn and its dependencies (first run takes a few minutes) ..." >&2
  # -c pins the tested versions, so torch comes from the local wheel files, not a fresh download.
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    -c "$repo/requirements.txt" -e "$repo[test]" 2> >(grep -v "is ignored: it is neither" >&2)
  echo "$want" > "$stamp"
fi
echo "$venv/bin/python"
