# Sourced by the other scripts: a local virtual environment with requirements.txt installed.
# Re-installs only when the requirements change (their hash is stamped inside the venv).
#   . scripts/env.sh            .venv, the project's environment
#   bash scripts/env.sh --vllm  .venv-vllm as well: the same with vLLM (requirements-vllm.txt), for --engine vllm;
#                               sourced with --vllm, it activates that one
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

install_venv() {  # install_venv <venv> <requirements file with its pins> <extra requirements file or "">
  local venv="$1" reqs="$2" extra="$3" stamp="$1/.requirements.sha256" want
  want="$(cat "$reqs" "$ROOT/requirements-nodeps.txt" ${extra:+"$extra"} | sha256sum | cut -d' ' -f1)"
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "installing requirements into $venv ..."
    if [ -n "$extra" ]; then  # the extra file's pins replace the main file's for the same packages
      local names base
      names="$(grep -v '^\s*#' "$extra" | sed -E 's/[<>=! ].*//' | grep -v '^$' | paste -sd'|')"
      base="$(mktemp)"
      grep -Ev "^($names)([<>=! ]|$)" "$reqs" > "$base"
      "$venv/bin/pip" install --disable-pip-version-check -q torch=="$(sed -nE 's/^torch==(.*)/\1/p' "$reqs")"
      "$venv/bin/pip" install --disable-pip-version-check -q -r "$base" -r "$extra"
      rm -f "$base"
      "$venv/bin/pip" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
    else
      "$venv/bin/pip" install --disable-pip-version-check -q -r "$reqs"
    fi
    "$venv/bin/pip" install --disable-pip-version-check -q --no-deps -r "$ROOT/requirements-nodeps.txt"
    echo "$want" > "$stamp"
  fi
}

VENV="${VENV:-$ROOT/.venv}"
install_venv "$VENV" "$ROOT/requirements.txt" ""
if [ "${1:-}" = "--vllm" ]; then
  VENV="${VENV_VLLM:-$ROOT/.venv-vllm}"
  install_venv "$VENV" "$ROOT/requirements.txt" "$ROOT/requirements-vllm.txt"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export TOKENIZERS_PARALLELISM=false
cd "$ROOT"
