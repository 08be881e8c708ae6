# Sourced by the other scripts: a local virtual environment with requirements.txt installed.
# Re-installs only when requirements.txt changes (its hash is stamped inside the venv).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
STAMP="$VENV/.requirements.sha256"
WANT="$(cat "$ROOT/requirements.txt" "$ROOT/requirements-nodeps.txt" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "installing requirements into $VENV ..."
  "$VENV/bin/pip" install --disable-pip-version-check -q -r "$ROOT/requirements.txt"
  "$VENV/bin/pip" install --disable-pip-version-check -q --no-deps -r "$ROOT/requirements-nodeps.txt"
  echo "$WANT" > "$STAMP"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export TOKENIZERS_PARALLELISM=false
cd "$ROOT"
