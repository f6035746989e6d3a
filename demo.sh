#!/usr/bin/env bash
# The offline demo from a fresh clone: the project's environment (created or reused, see setup_env.sh), then
# the whole pipeline on the bundled tiny preset. Extra arguments go to run_pipeline.sh (e.g. --jobs 1).
#   bash demo.sh                          # writes runs/demo/
#   bash demo.sh --work_dir /tmp/demo     # elsewhere
set -euo pipefail
cd "$(dirname "$0")"
source setup_env.sh
work_dir=runs/demo
for arg in "$@"; do [[ $arg == --work_dir || $arg == --work_dir=* ]] && work_dir=; done
echo "demo: bash run_pipeline.sh --preset tiny ${work_dir:+--work_dir $work_dir }$*"
exec bash run_pipeline.sh --preset tiny ${work_dir:+--work_dir "$work_dir"} "$@"
