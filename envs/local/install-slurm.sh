#!/usr/bin/env bash
# Install Slurm (slurmctld, slurmd, clients) and munge from Debian packages, for the real single-host
# cluster the `slurm` tests bring up (tests/slurm_cluster.py), plus shellcheck for the job-template tests.
#   bash envs/local/install-slurm.sh
# Idempotent: returns at once when the binaries are present. Never fails the build: without root or
# apt-get it prints why and exits 0, and the tests that need Slurm then skip with that reason.
set -uo pipefail

say()  { printf '[envs/local/slurm] %s\n' "$*"; }
warn() { printf '[envs/local/slurm] WARNING: %s\n' "$*" >&2; }

missing() {  # prints the commands of "$@" not on PATH (sbin included: Debian puts the daemons there)
  local c
  for c in "$@"; do
    PATH="$PATH:/usr/sbin:/sbin" command -v "$c" >/dev/null 2>&1 || printf '%s ' "$c"
  done
}

# apt_install WHAT PACKAGE…: installs quietly, or warns why not; never exits non-zero.
apt_install() {
  local what="$1"; shift
  if [[ "$(id -u)" != 0 ]]; then
    warn "$what missing and not root (uid $(id -u)): run 'apt-get install $*' as root; dependent tests will skip"
    return 0
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    warn "$what missing and no apt-get on this machine: install $* by hand; dependent tests will skip"
    return 0
  fi
  say "installing $* (apt-get, no recommends)"
  # update only when the package lists lack a candidate (a fresh container ships with none)
  if ! apt-cache show "$1" >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null 2>&1 || warn "apt-get update failed"
  fi
  # debconf's "delaying package configuration" notes are noise in a container without apt-utils
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null \
      2> >(grep -v "^debconf: delaying package configuration" >&2); then
    warn "apt-get install $* failed (see above); dependent tests will skip"
  fi
}

# `slurmd -V` needs no slurm.conf (client commands do, even for --version)
version() { PATH="$PATH:/usr/sbin" slurmd -V 2>/dev/null | cut -d' ' -f2; }

need="$(missing slurmctld slurmd munged sbatch)"
if [[ -z "$need" ]]; then
  say "slurm $(version) and munge are installed"
else
  apt_install "Slurm/munge (${need% })" slurm-wlm munge
  need="$(missing slurmctld slurmd munged sbatch)"
  [[ -z "$need" ]] && say "slurm $(version) and munge installed"
  [[ -n "$need" ]] && warn "still missing: ${need% }"
fi

if [[ -z "$(missing shellcheck)" ]]; then
  say "shellcheck $(shellcheck --version | sed -n 's/^version: //p') is installed"
else
  apt_install shellcheck shellcheck
fi
exit 0
