#!/usr/bin/env bash
# The environment for GPU runs on a lent machine (Python 3.12, torch with CUDA, no network).
#
#   bench/gpu_env.sh prepare      here: the py3.12 wheels the machine lacks into .whl/, and
#                                 Debian's redis-server with its libraries into .gpu/
#   source bench/gpu_env.sh setup there: installs those and stagepool itself (its C helpers
#                                 built for that Python) into /tmp/site; puts redis-server on
#                                 PATH. Then run anything, e.g. `python3 -m pytest ...`.
#
# Both folders are git-ignored (.git/info/exclude); carry them: carry = [".whl", ".gpu"].
set -euo pipefail
WHEELS=(diffusers==0.42.1 msgspec==0.22.0 pyzmq==27.3.0 redis==8.1.0 hiredis==3.5.0
        starlette==1.10.0 uvicorn==0.54.0 importlib_metadata==10.2.0 av==17.0.0
        httpx==0.28.1 httpcore==1.0.9 python-json-logger==4.2.0 python-multipart==0.0.34
        ftfy==6.3.1 wcwidth==0.9.4 pillow==13.0.0 peft==0.21.2 accelerate==1.15.0)

prepare() {
  rm -rf .whl .gpu && mkdir -p .whl .gpu/lib
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
  cp /usr/bin/redis-server .gpu/
  for lib in liblzf.so.1 libjemalloc.so.2 libatomic.so.1; do cp "/lib/x86_64-linux-gnu/$lib" .gpu/lib/; done
  du -sh .whl .gpu
}

setup() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
  # stagepool itself, built here: its C helpers for this Python, its entry points.
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .
  mkdir -p /tmp/bin && cp .gpu/redis-server /tmp/bin/
  export PATH=/tmp/bin:$PATH LD_LIBRARY_PATH=$PWD/.gpu/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  redis-server --version
}

"${1:?prepare or setup}"
