#!/usr/bin/env bash
# System (non-pip) dependencies: installs what is missing with apt-get where it can (as root, or
# through sudo), then checks again. Called by scripts/setup.sh; safe to re-run.
#
#   espeak-ng          speech synthesis (edge-glass speak, spoken captions; the speech tests use it)
#   chromium           headless browser the report tests render report.html in (edge-glass report)
#   chromium-driver    chromedriver, through which selenium drives it
#
# Still missing afterwards: with CI=true (or 1 / yes) in the environment, a one-line error and
# exit 1, so CI cannot go green with every speech test skipped; otherwise a warning and exit 0
# (the tests that need it skip).
set -uo pipefail

is_ci() {
  case "${CI:-}" in
    [Tt][Rr][Uu][Ee] | 1 | [Yy][Ee][Ss]) return 0 ;;
    *) return 1 ;;
  esac
}

# apt_install PACKAGE: 0 when apt-get installed it; otherwise prints why not and returns 1.
apt_install() {
  local sudo=()
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "no apt-get on PATH"
    return 1
  fi
  if [ "$(id -u 2>/dev/null)" != 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
      echo "not root and no sudo"
      return 1
    fi
    sudo=(sudo)
  fi
  # the package lists may be missing (a fresh container) or stale: update once, then retry
  "${sudo[@]}" apt-get install -y -q "$1" >/dev/null 2>&1 && return 0
  "${sudo[@]}" apt-get update -q >/dev/null 2>&1 && "${sudo[@]}" apt-get install -y -q "$1" >/dev/null 2>&1 && return 0
  echo "apt-get install -y $1 failed"
  return 1
}

# require COMMAND PACKAGE WHAT: COMMAND on PATH, installing PACKAGE if needed; 1 if still missing.
require() {
  local cmd=$1 pkg=$2 what=$3 why
  command -v "$cmd" >/dev/null 2>&1 && return 0
  why=$(apt_install "$pkg") && command -v "$cmd" >/dev/null 2>&1 && return 0
  [ -n "$why" ] || why="installed, but $cmd is still not on PATH"
  if is_ci; then
    echo "error: missing system dependency $pkg, needed for $what: $why. Install it (apt-get install $pkg); with CI=true this fails instead of skipping its tests" >&2
  else
    echo "warning: missing system dependency $pkg, needed for $what: $why. It is unavailable and its tests will skip" >&2
  fi
  return 1
}

status=0
require espeak-ng espeak-ng "speech synthesis (edge-glass speak)" || status=1
require chromium chromium "rendering report.html in the report tests (headless Chromium)" || status=1
require chromedriver chromium-driver "driving headless Chromium from the report tests (selenium)" || status=1

if [ "$status" != 0 ] && is_ci; then
  exit 1
fi
exit 0
