#!/usr/bin/env bash
# Checks that every C++ file under include/ src/ tests/ bench/ python/ (tests/data excluded) is
# formatted as the repository's .clang-format says, with clang-format 14 (Debian package
# clang-format-14; another version formats some constructs differently).
#   scripts/check-format.sh         lists the files that differ and exits 1 if there are any
#   scripts/check-format.sh --fix   rewrites those files in place
# CLANG_FORMAT=/path/to/clang-format-14 overrides the binary.
set -euo pipefail
cd "$(dirname "$0")/.."

fix=0
case "${1:-}" in
  "") ;;
  --fix) fix=1 ;;
  -h|--help) sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "check-format: unknown argument '$1' (use --fix or nothing)" >&2; exit 2 ;;
esac

cf="${CLANG_FORMAT:-clang-format-14}"
if ! command -v "$cf" >/dev/null 2>&1; then
  echo "check-format: $cf not found (apt-get install clang-format-14)" >&2
  exit 2
fi
if ! "$cf" --version | grep -q 'version 14\.'; then
  echo "check-format: $cf is not clang-format 14: $("$cf" --version)" >&2
  exit 2
fi

mapfile -d '' files < <(find include src tests bench python -path tests/data -prune -o \
  -type f \( -name '*.h' -o -name '*.cpp' -o -name '*.cc' \) -print0 | sort -z)

differing() {  # sets differ to the files of "$@" that clang-format would change
  differ=()
  local f
  for f in "$@"; do
    if ! "$cf" --style=file "$f" | cmp -s - "$f"; then differ+=("$f"); fi
  done
}

differing "${files[@]}"
if [ ${#differ[@]} -eq 0 ]; then
  echo "check-format: all ${#files[@]} files formatted ($("$cf" --version | head -n1))"
  exit 0
fi
if [ $fix -eq 1 ]; then
  printf 'check-format: reformatting %s\n' "${differ[@]}"
  n=${#differ[@]}
  # clang-format is not always idempotent (a macro call after an unbraced `if` can move again
  # on a second pass), so format until nothing changes, three passes at most.
  for _ in 1 2 3; do
    "$cf" --style=file -i "${differ[@]}"
    differing "${differ[@]}"
    [ ${#differ[@]} -eq 0 ] && break
  done
  if [ ${#differ[@]} -ne 0 ]; then
    printf 'check-format: still changing after 3 passes: %s\n' "${differ[@]}" >&2
    exit 1
  fi
  echo "check-format: reformatted $n of ${#files[@]} files"
  exit 0
fi
printf 'check-format: not formatted: %s\n' "${differ[@]}"
echo "check-format: ${#differ[@]} of ${#files[@]} files differ from .clang-format;" \
  "run scripts/check-format.sh --fix" >&2
exit 1
