#!/usr/bin/env bash
# Carry NVIDIA DALI to a GPU machine that has no network (the project's lent device: Python 3.12, no DALI).
#
#   bash scripts/dali_wheels.sh pack [cuda130|cuda120]   # here, with network: wheels/dali/dali.tar.part-*
#   bash scripts/dali_wheels.sh install [--dry-run]      # there: join, verify, pip install --no-index
#
# pack downloads nvidia-dali-<variant> and its dependencies as Python 3.12 manylinux x86_64 wheels (numpy
# excluded: the device has it), puts them in one uncompressed tar (wheels are already compressed) and
# splits it into 60 MB parts with a manifest (variant, part names, sha256 of the whole tar). The parts are
# ignored files: send one per device call with `carry: ["wheels/dali/dali.tar.part-aa"]`, then -ab, ...
# while the machine stays warm (ignored files already there are kept between calls), and the last call
# runs scripts/gpu_check.sh, which calls `install` when DALI is missing and all parts are present.
# cuda130 needs a driver for CUDA 13; cuda120 is the package for CUDA 12 drivers.
# Environment: DALI_WHEELS_DIR (default wheels/dali), DALI_WHEELS_SRC (pack: use these wheel files
# instead of downloading; tests), PYTHON (default python3).
set -euo pipefail
DIR="${DALI_WHEELS_DIR:-wheels/dali}"
PY="${PYTHON:-python3}"
PART_SIZE=60M

pack() {
  local variant="${1:-cuda130}"
  case "$variant" in cuda130|cuda120) ;; *) echo "error: variant must be cuda130 or cuda120, got '$variant'" >&2; exit 2 ;; esac
  local stage="$DIR/stage"
  rm -rf "$DIR" && mkdir -p "$stage"
  if [ -n "${DALI_WHEELS_SRC:-}" ]; then
    cp "$DALI_WHEELS_SRC"/*.whl "$stage"/
  else
    "$PY" -m pip download --quiet "nvidia-dali-$variant" -d "$stage" --python-version 3.12 --only-binary=:all: \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux2014_x86_64 \
      --platform manylinux_2_17_x86_64 --platform linux_x86_64
    rm -f "$stage"/numpy-*.whl
  fi
  (cd "$stage" && tar -cf ../dali.tar ./*.whl)
  rm -rf "$stage"
  (cd "$DIR" && split -b "$PART_SIZE" -a 2 dali.tar dali.tar.part- && sha256sum dali.tar | cut -d' ' -f1 > sha256 && rm dali.tar)
  { echo "variant=$variant"; echo "sha256=$(cat "$DIR/sha256")"; echo "parts=$(cd "$DIR" && ls dali.tar.part-* | tr '\n' ' ')"; } > "$DIR/manifest"
  rm "$DIR/sha256"
  echo "wrote $DIR/manifest and $(ls "$DIR"/dali.tar.part-* | wc -l) parts:"
  ls -l "$DIR"
  echo "carry the manifest with the first part, then one part per call: wheels/dali/manifest, wheels/dali/dali.tar.part-aa, ..."
}

install() {
  local dry="${1:-}"
  [ -f "$DIR/manifest" ] || { echo "error: $DIR/manifest missing: run 'bash scripts/dali_wheels.sh pack' and carry it" >&2; exit 2; }
  local variant sha parts missing=""
  variant=$(sed -n 's/^variant=//p' "$DIR/manifest")
  sha=$(sed -n 's/^sha256=//p' "$DIR/manifest")
  parts=$(sed -n 's/^parts=//p' "$DIR/manifest")
  for part in $parts; do [ -f "$DIR/$part" ] || missing="$missing $part"; done
  [ -z "$missing" ] || { echo "error: DALI parts not here yet:$missing (carry them, one per call)" >&2; exit 2; }
  work=$(mktemp -d)  # global: the EXIT trap runs after this function has returned
  trap 'rm -rf "${work:-}"' EXIT
  (cd "$DIR" && cat $parts) > "$work/dali.tar"
  echo "$sha  $work/dali.tar" | sha256sum -c --quiet - || { echo "error: joined DALI tar does not match the manifest's sha256" >&2; exit 2; }
  mkdir "$work/wheels" && tar -xf "$work/dali.tar" -C "$work/wheels" && rm "$work/dali.tar"
  local cmd=("$PY" -m pip install --no-index --find-links "$work/wheels" "nvidia-dali-$variant")
  if [ "$dry" = "--dry-run" ]; then
    echo "would run: ${cmd[*]}"
    ls "$work/wheels"
  else
    "${cmd[@]}"
    "$PY" -c 'import nvidia.dali as d; print("DALI", d.__version__)'
  fi
}

case "${1:-}" in
  pack) shift; pack "$@" ;;
  install) shift; install "$@" ;;
  *) echo "usage: bash scripts/dali_wheels.sh pack [cuda130|cuda120] | install [--dry-run]" >&2; exit 2 ;;
esac
