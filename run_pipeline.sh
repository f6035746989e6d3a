#!/usr/bin/env bash
# Run the pipeline's six stages in order; see `bash run_pipeline.sh --help`.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python}
STAGES=(data reward ppo grpo dpo eval)
declare -A SCRIPT=([data]=data_process.py [reward]=reward_model_training.py [ppo]=PPO_training.py
  [grpo]=GRPO_training.py [dpo]=DPO_training.py [eval]=evaluate_models.py)

usage() {
  cat <<'EOF'
Usage: bash run_pipeline.sh [--FLAG VALUE ...] [--STAGE.FLAG VALUE ...] [--from STAGE | --only STAGE]

Runs data_process.py, reward_model_training.py, PPO_training.py, GRPO_training.py, DPO_training.py and
evaluate_models.py in order (stages: data reward ppo grpo dpo eval), and stops at the first that fails.

  --FLAG VALUE        goes to every stage: --preset, --work_dir, --seed, --model, ...
  --STAGE.FLAG VALUE  goes to one stage only: --ppo.total_steps 5, --dpo.max_steps 40, --eval.num_prompts 50
  --from STAGE        start at STAGE; the earlier stages' outputs must be in --work_dir already
  --only STAGE        run STAGE alone
  -h, --help          this help (a stage's flags: python SCRIPT.py --help)

  bash run_pipeline.sh --preset tiny --work_dir runs/demo                       # offline, CPU, minutes
  bash run_pipeline.sh --preset tiny --work_dir runs/demo --from ppo --ppo.total_steps 40
  bash run_pipeline.sh --work_dir runs/gpt2                                     # gpt2 + hh-rlhf (GPU)
EOF
}

die() {
  echo "run_pipeline.sh: error: $1" >&2
  exit 2
}

stage_index() { # the position of stage $1 in STAGES, or a one-line error
  for i in "${!STAGES[@]}"; do [[ ${STAGES[i]} == "$1" ]] && echo "$i" && return; done
  die "$2: unknown stage '$1' (stages: ${STAGES[*]})"
}

# Split the command line: flags for every stage, flags for one stage (`--ppo.x`), and the stage range.
# A value is every word after a flag up to the next `--` word, so `--x 1`, `--x=1` and bare switches work.
declare -A STAGE_ARGS=()
common=() first=0 last=$((${#STAGES[@]} - 1)) target=common
while (($#)); do
  word=$1
  shift
  case $word in
    -h | --help) usage && exit 0 ;;
    --from | --only)
      (($#)) || die "$word needs a stage (${STAGES[*]})"
      first=$(stage_index "$1" "$word")
      [[ $word == --only ]] && last=$first
      shift
      continue
      ;;
    --*.*)
      stage=${word%%.*} stage=${stage#--}
      stage_index "$stage" "$word" >/dev/null
      target=$stage word=--${word#*.}
      ;;
    --*) target=common ;;
  esac
  if [[ $target == common ]]; then
    common+=("$word")
  else
    STAGE_ARGS[$target]+=" $(printf '%q' "$word")"
  fi
done

# --work_dir must exist before the first script writes into it
for ((i = 0; i < ${#common[@]}; i++)); do
  case "${common[i]}" in
    --work_dir) mkdir -p "${common[i + 1]}" ;;
    --work_dir=*) mkdir -p "${common[i]#--work_dir=}" ;;
  esac
done

# The tiny models are too small for two BLAS threads to pay off, and on a busy machine two threads
# per process thrash (we measured 2-5x slower): one thread unless the caller says otherwise.
if [[ " ${common[*]} " == *" --preset tiny "* || " ${common[*]} " == *" --preset=tiny "* ]]; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi

# Into a log file rather than a terminal, progress bars redraw every 30 s instead of ten times a second
# (tqdm reads TQDM_* variables as its defaults): a log holds progress, not megabytes of redraws.
[[ -t 2 ]] || export TQDM_MININTERVAL=${TQDM_MININTERVAL:-30}

start=$(date +%s)
for ((i = first; i <= last; i++)); do
  stage=${STAGES[i]}
  eval "own=(${STAGE_ARGS[$stage]:-})"
  echo "== ${SCRIPT[$stage]} ${common[*]} ${own[*]}"
  t0=$(date +%s)
  "$PYTHON" "${SCRIPT[$stage]}" "${common[@]}" "${own[@]}"
  echo "== ${SCRIPT[$stage]} done in $(($(date +%s) - t0)) s"
done
echo "== pipeline done in $(($(date +%s) - start)) s"
