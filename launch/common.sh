# Shared by the launch scripts: `run CMD...` prints the command and, unless DRY_RUN=1, runs it.
set -euo pipefail

DRY_RUN=${DRY_RUN:-0}

run() {
  printf '+'
  printf ' %q' "$@"
  printf '\n'
  if [[ "$DRY_RUN" != 1 ]]; then
    "$@"
  fi
}

die() {
  echo "error: $*" >&2
  exit 2
}
