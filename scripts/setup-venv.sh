#!/usr/bin/env bash
# Create .venv when missing and install the project with the extras this machine can take.
# ffcv needs system libraries: installed here when missing if we are root with apt-get, else skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

have_ffcv_libs() {
    command -v pkg-config >/dev/null 2>&1 && pkg-config --exists opencv4 2>/dev/null \
        && { [ -f /usr/include/turbojpeg.h ] || pkg-config --exists libturbojpeg 2>/dev/null; }
}

extras="dev,attacks,report,remote,loggers,hf"
if [ "${PIPELINE_NO_FFCV:-0}" != 1 ]; then
    if ! have_ffcv_libs; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            echo "setup: installing ffcv's system libraries (libturbojpeg0-dev libopencv-dev pkg-config)"
            export DEBIAN_FRONTEND=noninteractive
            { apt-get update -qq && apt-get install -y -qq --no-install-recommends \
                libturbojpeg0-dev libopencv-dev pkg-config >/dev/null; } \
                || echo "setup: apt-get failed; the ffcv parts will be skipped"
        else
            echo "setup: ffcv's system libraries are missing and this is not root: the ffcv parts are skipped"
        fi
    fi
    have_ffcv_libs && extras="dev,attacks,report,remote,loggers,hf,ffcv"
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
stamp="$VENV/.installed-$(cat pyproject.toml | sha256sum | cut -c1-16)-${extras/,/-}"
if [ ! -f "$stamp" ]; then
    echo "setup: installing pipeline[$extras] into $VENV"
    log="$VENV/install.log"
    if ! "$VENV/bin/python" -m pip install -e ".[$extras]" >"$log" 2>&1 && [ "$extras" = "dev,attacks,report,remote,loggers,hf,ffcv" ]; then
        echo "setup: installing with ffcv failed (see $log); installing without it"
        extras="dev,attacks,report,remote,loggers,hf"
        "$VENV/bin/python" -m pip install -e ".[$extras]" >>"$log" 2>&1 || true
    fi
    if ! "$VENV/bin/python" -c "import pipeline, torch, webdataset, faiss, simplejpeg" 2>/dev/null; then
        echo "setup: installation failed; the end of $log:" >&2
        tail -n 20 "$log" >&2
        exit 1
    fi
    if [ "$extras" = "dev,attacks,report,remote,loggers,hf,ffcv" ] && ! "$VENV/bin/python" -c "import ffcv.loader" 2>/dev/null; then
        echo "setup: ffcv did not install; the ffcv parts will be skipped"
    fi
    rm -f "$VENV"/.installed-*
    touch "$stamp"
fi
