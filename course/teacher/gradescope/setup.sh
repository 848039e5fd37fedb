#!/usr/bin/env bash
# Gradescope runs this once, as root, while it builds the grading image: Python, then, in a
# venv that run_autograder uses, the pinned CPU build of torch (no CUDA build to download)
# and the handout's requirements. Pick a base image with Python 3.11 or newer (Ubuntu 24.04).
set -euo pipefail
ROOT=${AUTOGRADER_ROOT:-/autograder}
apt-get update
apt-get install -y python3 python3-venv python3-pip
python3 -m venv "$ROOT/venv"
"$ROOT/venv/bin/pip" install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
"$ROOT/venv/bin/pip" install -r "$ROOT/source/handout/requirements.txt"
