#!/usr/bin/env bash
# The one install of stagepool: `make setup` and both container images (deploy/Dockerfile) run
# this, so a laptop, CI and a cluster get the same pinned packages.
#
#   deploy/install.sh [debs] [python] [pyverbs]     debs and python when none is named
#
# debs    Debian's runtime packages (redis-server, the RDMA and NUMA libraries Mooncake links,
#         python3-pyverbs), those missing only; as root, else a warning.
# python  the virtualenv $VENV (default .venv) with stagepool and the extras $EXTRAS (default
#         test,models,transfer), every version pinned by constraints.txt; editable unless
#         EDITABLE=0 (the images). TORCH_INDEX_URL: where torch comes from (the CUDA image's
#         index; default: pip's own, which gives CI its CPU wheel).
# pyverbs link Debian's pyverbs into $VENV (python does; the runtime image after debs)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-test,models,transfer}
EDITABLE=${EDITABLE:-1}
PYTHON=${PYTHON:-python3}
DEB_PACKAGES="redis-server libibverbs1 ibverbs-providers librdmacm1 libnuma1 python3-pyverbs"

debs() {
  local missing=""
  for p in $DEB_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
  [ -z "$missing" ] && return 0
  if [ "$(id -u)" = 0 ]; then
    echo "installing Debian packages:$missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
  else
    echo "warning: missing Debian packages (run as root to install):$missing" >&2
  fi
}

python_env() {
  test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  local target=".[$EXTRAS]" index=()
  [ "$EDITABLE" = 1 ] && target="-e .[$EXTRAS]"
  [ -n "${TORCH_INDEX_URL:-}" ] && index=(--extra-index-url "$TORCH_INDEX_URL")
  # shellcheck disable=SC2086  # $target is one or two words on purpose
  "$VENV/bin/python" -m pip install -q "${index[@]}" -c constraints.txt $target
  pyverbs
}

pyverbs() {
  # pyverbs comes from Debian (python3-pyverbs), built for CPython 3.11: link it in.
  local site
  site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  if [ -d /usr/lib/python3/dist-packages/pyverbs ]; then
    ln -sfn /usr/lib/python3/dist-packages/pyverbs "$site/pyverbs"
  fi
}

steps=("$@")
[ ${#steps[@]} = 0 ] && steps=(debs python)
for step in "${steps[@]}"; do
  case "$step" in
    debs) debs ;;
    python) python_env ;;
    pyverbs) pyverbs ;;
    *) echo "unknown step $step (debs, python, pyverbs)" >&2; exit 2 ;;
  esac
done
