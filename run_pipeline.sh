#!/usr/bin/env bash
# Run the pipeline's stages in order (or side by side with --jobs); see `bash run_pipeline.sh --help`.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python}
STAGES=(data reward sft gold ppo grpo grpo_oracle dpo eval notebook) # in this order when two are ready at once
OPT_IN=(grpo_oracle) # run only when named: --only grpo_oracle, or --with grpo_oracle beside the others
declare -A SCRIPT=([data]=data_process.py [sft]=SFT_training.py [reward]=reward_model_training.py
  [gold]=reward_model_training.py
  [ppo]=PPO_training.py [grpo]=GRPO_training.py [grpo_oracle]=GRPO_training.py [dpo]=DPO_training.py [eval]=evaluate_models.py
  [notebook]=analysis_notebook.ipynb)
declare -A FIXED=([gold]="--train_split gold_train" [grpo_oracle]="--reward_funcs oracle --run_name grpo_oracle")
# What each stage reads: with --jobs 2, stages whose inputs are ready run side by side
# (the policies score held-out replies by both reward models while they train: live_eval.py)
declare -A NEEDS=([data]="" [sft]=data [reward]=data [gold]=data [ppo]="sft reward gold" [grpo]="sft reward gold"
  [grpo_oracle]="sft reward gold" [dpo]="sft reward gold" [eval]="sft reward gold ppo grpo grpo_oracle dpo"
  [notebook]=eval)
# --preset real: SmolLM2-135M-Instruct (assets/get_smollm2.py) on real hh-rlhf rows, sized for a 2-core CPU in
# bf16 (docs/real_rehearsal.md has the measurements behind each number). Each script's gpt2-preset defaults with
# these flags put before the caller's own, which win.
REAL_MODEL=models/SmolLM2-135M-Instruct
rm_sizes="--per_device_train_batch_size 4 --gradient_accumulation_steps 2 --per_device_eval_batch_size 8"
declare -A REAL=(
  [data]="--test_share 0.25 --gold_share 0.2 --max_length 256"
  [reward]="$rm_sizes --learning_rate 5e-5 --max_steps 100 --eval_steps 50 --save_steps 50 --logging_steps 5"
  [gold]="$rm_sizes --learning_rate 5e-5 --max_steps 35 --eval_steps 35 --save_steps 35 --logging_steps 5"
  [sft]="--max_steps 50 --max_seq_len 256 --learning_rate 2e-5 --eval_steps 25 --save_every 25 --max_eval_samples 64
    --logging_steps 5"
  [ppo]="--total_steps 20 --rollout_batch_size 8 --num_minibatches 2 --learning_rate 1e-5 --max_prompt_length 192
    --max_new_tokens 48 --reward_max_length 256 --test_prompts 32 --eval_batch_size 16 --save_every 10
    --log_samples_every 10 --eval_every 0"
  [grpo]="--total_steps 60 --rollout_batch_size 1 --group_size 4 --learning_rate 1e-5 --max_new_tokens 48
    --reward_max_length 256 --eval_prompts 32 --eval_every 20 --eval_batch_size 16 --save_every 20"
  [dpo]="--max_steps 40 --per_device_train_batch_size 2 --gradient_accumulation_steps 4 --learning_rate 1e-5
    --max_seq_len 256 --eval_steps 20 --save_every 20 --max_eval_samples 64 --logging_steps 5 --eval_every 0"
  [eval]="--num_prompts 128 --max_new_tokens 48 --reward_max_length 256 --frontier false")

usage() {
  cat <<'EOF'
Usage: bash run_pipeline.sh [--FLAG VALUE ...] [--STAGE.FLAG VALUE ...] [--from STAGE | --only STAGE]
                            [--skip STAGE] [--with grpo_oracle] [--jobs N]

Runs data_process.py, reward_model_training.py (the proxy reward model), SFT_training.py, the gold
reward model (where processed_data/ has a gold_train split), PPO_training.py, GRPO_training.py,
DPO_training.py and evaluate_models.py (stages: data reward sft gold ppo grpo dpo eval), and stops at
the first that fails. PPO, GRPO and DPO start from the SFT model (their --init_from auto).
The stage `notebook` (only when named: --only notebook) executes analysis_notebook.ipynb on the
work dir's evaluation with nbconvert and saves it, outputs and figures, into --work_dir.

  --FLAG VALUE        goes to every stage: --preset, --work_dir, --seed, --model, ...
  --preset real       SmolLM2-135M-Instruct (python assets/get_smollm2.py) on real hh-rlhf pairs (--data.dataset),
                      sized for a 2-core CPU in bf16: about an hour (docs/real_rehearsal.md)
  --STAGE.FLAG VALUE  goes to one stage only: --ppo.total_steps 5, --dpo.max_steps 40, --eval.num_prompts 50
  --report_to T       the training stages' experiment trackers: tensorboard, wandb, trackio, or a comma list
  --from STAGE        start at STAGE; the earlier stages' outputs must be in --work_dir already
  --only STAGE        run STAGE alone
  --with grpo_oracle  run the opt-in stage grpo_oracle too: GRPO against the tiny world's oracle (tiny data only;
                      GRPO_training.py --reward_funcs oracle --run_name grpo_oracle), which the evaluation
                      then shows beside the proxy-trained GRPO. Alone: --only grpo_oracle, then --only eval
  --skip STAGE        leave STAGE out (repeatable); --skip sft runs the pipeline without SFT: the
                      policies start from the base model (--init_from base), even beside an sft_model/
  --seeds 1,2,3       the training stages and the evaluation once per seed, into WORK_DIR/seed-N/ (--seed N),
                      on one data split and one set of test prompts (the data stage and the evaluation keep
                      --seed, 42 unless given), then aggregate_seeds.py: each method's mean over the seeds
                      with an interval across them (rlhf_eval_seeds.csv, rlhf_eval_seeds_frontier.png)
  --jobs N            run up to N stages at once where their inputs are ready (sft, reward and gold need
                      only the data; dpo the SFT model; ppo and grpo both); a stage beside another writes its
                      output to WORK_DIR/logs/STAGE.log. Default 2 for --preset tiny on 2 or more cores
                      (one BLAS thread each), else 1 (one GPU runs one stage at a time; on CUDA, stages
                      go side by side only on devices named in CUDA_VISIBLE_DEVICES=0,1, one each)
  -h, --help          this help (a stage's flags: python SCRIPT.py --help)

  bash run_pipeline.sh --preset tiny --work_dir runs/demo                       # offline, CPU, minutes
  bash run_pipeline.sh --preset tiny --work_dir runs/demo --from ppo --ppo.total_steps 40
  bash run_pipeline.sh --preset tiny --work_dir runs/nosft --skip sft          # the policies from base
  bash run_pipeline.sh --preset tiny --work_dir runs/demo --only notebook       # the analysis, executed
  bash run_pipeline.sh --preset tiny --work_dir runs/demo --with grpo_oracle    # + GRPO against the oracle
  bash run_pipeline.sh --preset tiny --work_dir runs/seeds --seeds 1,2,3       # three seeds, aggregated
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
LAST_DEFAULT=$(stage_index eval) # the last stage run by default: the notebook runs only when named

# Split the command line: flags for every stage, flags for one stage (`--ppo.x`), and the stage range.
# A value is every word after a flag up to the next `--` word, so `--x 1`, `--x=1` and bare switches work.
declare -A STAGE_ARGS=() SKIP=() WITH=()
common=() first=0 last=$LAST_DEFAULT target=common jobs= preset= seeds= argv=()
for ((i = 1; i <= $#; i++)); do # the command line without --seeds, for each seed's run
  [[ ${!i} == --seeds ]] && i=$((i + 1)) && continue
  [[ ${!i} == --seeds=* ]] || argv+=("${!i}")
done
while (($#)); do
  word=$1
  shift
  case $word in
    -h | --help) usage && exit 0 ;;
    --jobs | --jobs=*)
      if [[ $word == --jobs ]]; then
        jobs=${1:-}
        (($#)) && shift
      else
        jobs=${word#--jobs=}
      fi
      [[ $jobs =~ ^[1-9][0-9]*$ ]] || die "--jobs needs a positive number of stages, got '$jobs'"
      continue
      ;;
    --seeds | --seeds=*)
      if [[ $word == --seeds ]]; then
        seeds=${1:-}
        (($#)) && shift
      else
        seeds=${word#--seeds=}
      fi
      [[ $seeds =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--seeds needs a comma list of seeds (1,2,3), got '$seeds'"
      continue
      ;;
    --preset | --preset=*)
      preset=${word#--preset=}
      if [[ $word == --preset ]]; then
        (($#)) || die "--preset needs a name (gpt2, tiny, real)"
        preset=$1
        shift
      fi
      [[ $preset == real ]] || common+=(--preset "$preset") # real: the gpt2 preset's scripts with REAL's flags
      continue
      ;;
    --report_to | --report_to=*) # a training script's flag: the data and eval stages have no trackers
      value=${word#--report_to=}
      if [[ $word == --report_to ]]; then
        (($#)) || die "--report_to needs a tracker list (tensorboard, wandb, trackio)"
        value=$1
        shift
      fi
      for stage in sft reward gold ppo grpo grpo_oracle dpo; do STAGE_ARGS[$stage]+=" --report_to $(printf '%q' "$value")"; done
      continue
      ;;
    --skip | --skip=*)
      if [[ $word == --skip ]]; then
        (($#)) || die "--skip needs a stage (${STAGES[*]})"
        word=$1
        shift
      fi
      stage=${word#--skip=}
      stage_index "$stage" --skip >/dev/null
      SKIP[$stage]=1
      # without SFT the policies start from the base model, even where an older run left an sft_model/
      [[ $stage != sft ]] || for s in ppo grpo grpo_oracle dpo; do STAGE_ARGS[$s]+=" --init_from base"; done
      continue
      ;;
    --with | --with=*)
      if [[ $word == --with ]]; then
        (($#)) || die "--with needs an opt-in stage (${OPT_IN[*]})"
        word=$1
        shift
      fi
      [[ " ${OPT_IN[*]} " == *" ${word#--with=} "* ]] || die "--with: '${word#--with=}' is no opt-in stage (${OPT_IN[*]})"
      WITH[${word#--with=}]=1
      continue
      ;;
    --from | --only)
      (($#)) || die "$word needs a stage (${STAGES[*]})"
      first=$(stage_index "$1" "$word")
      WITH[$1]=1 # an opt-in stage named here runs
      [[ $word == --only ]] && last=$first || last=$((first > LAST_DEFAULT ? first : LAST_DEFAULT))
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

for stage in "${OPT_IN[@]}"; do [[ -n ${WITH[$stage]:-} ]] || SKIP[$stage]=1; done
if [[ $preset == real ]]; then
  common=(--model "$REAL_MODEL" "${common[@]}")
  for stage in "${!REAL[@]}"; do STAGE_ARGS[$stage]="${REAL[$stage]} ${STAGE_ARGS[$stage]:-}"; done
  export RLHF_CPU_BF16=${RLHF_CPU_BF16:-1} # bf16 autocast where the CPU computes it natively (common.precision)
fi

# --work_dir must exist before the first script writes into it
work_dir=.
for ((i = 0; i < ${#common[@]}; i++)); do
  case "${common[i]}" in
    --work_dir) work_dir=${common[i + 1]} ;;
    --work_dir=*) work_dir=${common[i]#--work_dir=} ;;
  esac
done
mkdir -p "$work_dir"

# --seeds: this script once for the data (its split is every seed's), then once per seed into WORK_DIR/seed-N with
# --seed N for the training; the evaluation keeps the data's seed (--eval.seed), so every seed is scored on the
# same test prompts with the same sampling, and the seeds differ by their training alone.
if [[ -n $seeds ]]; then
  data_seed=42
  for ((i = 0; i < ${#common[@]}; i++)); do
    case "${common[i]}" in
      --seed) data_seed=${common[i + 1]} ;;
      --seed=*) data_seed=${common[i]#--seed=} ;;
    esac
  done
  if ((first == 0)) && [[ -z ${SKIP[data]:-} ]]; then
    bash "$0" "${argv[@]}" --only data
  fi
  for seed in ${seeds//,/ }; do
    echo "== seed $seed: $work_dir/seed-$seed"
    mkdir -p "$work_dir/seed-$seed"
    ln -sfn ../processed_data "$work_dir/seed-$seed/processed_data" # one split for every seed
    argv_seed=("${argv[@]}" --work_dir "$work_dir/seed-$seed" --seed "$seed" --eval.seed "$data_seed")
    ((last < $(stage_index data))) || bash "$0" "${argv_seed[@]}" --skip data
  done
  if ((first <= LAST_DEFAULT && last >= LAST_DEFAULT)) && [[ -z ${SKIP[eval]:-} ]]; then
    "$PYTHON" aggregate_seeds.py --work_dir "$work_dir"
  fi
  exit 0
fi

# The tiny models are too small for two BLAS threads to pay off in training, and two threads per
# process beside another process thrash (we measured 2-5x slower): one thread per stage unless the
# caller says otherwise, and the second core runs a second stage instead. A stage running alone (the
# data, the evaluation) gets every job's core: the evaluation then runs that many processes of one
# thread each (`evaluate_models.py --workers`), the same table as one process makes.
alone_threads=
# (SmolLM2 in bf16 runs 1.8x faster on two threads than on one: --preset real runs one stage at a time, on every core)
tiny_preset() { [[ $preset == tiny ]]; }
if tiny_preset; then
  cores=$(OMP_NUM_THREADS='' nproc) # nproc counts OMP_NUM_THREADS
  [[ -n $jobs ]] || jobs=$((cores >= 2 ? 2 : 1))
  [[ -n ${OMP_NUM_THREADS:-} ]] || alone_threads=$((jobs < cores ? jobs : cores))
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
jobs=${jobs:-1}
# A gpt2-sized stage fills a GPU (two reward models: about 2 x 8 GiB): on CUDA, stages other than the tiny
# preset's run side by side only on devices the caller names in CUDA_VISIBLE_DEVICES, one device each.
devices=()
if ((jobs > 1)) && ! tiny_preset; then
  gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null | tail -n 1) || gpus=0
  [[ $gpus =~ ^[0-9]+$ ]] || gpus=0
  if ((gpus > 0)); then
    IFS=, read -ra devices <<<"${CUDA_VISIBLE_DEVICES:-}"
    if ((${#devices[@]} >= 2)); then
      ((jobs <= ${#devices[@]})) || jobs=${#devices[@]}
      echo "== --jobs $jobs on CUDA: each stage beside another on a device of its own (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES})"
    else
      echo "== --jobs $jobs on CUDA: one stage at a time (two would share one GPU); name devices to run stages side by side, one each: CUDA_VISIBLE_DEVICES=0,1"
      jobs=1 devices=()
    fi
  fi
fi
if ((jobs > 1 && (BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1]) < 501)); then
  echo "== bash $BASH_VERSION cannot wait for the first of several stages (bash 5.1 can): one stage at a time"
  jobs=1
fi

# Into a log file rather than a terminal, progress bars redraw every 30 s instead of ten times a second
# (tqdm reads TQDM_* variables as its defaults): a log holds progress, not megabytes of redraws.
[[ -t 2 ]] || export TQDM_MININTERVAL=${TQDM_MININTERVAL:-30}

# The scheduler: a stage starts once the stages it reads are done (those before --from count as done),
# at most $jobs at a time, in the order of STAGES. A stage alone runs in the foreground, its output live.
declare -A STATE=() PID=() T0=() DEVICE=()
for ((i = 0; i < ${#STAGES[@]}; i++)); do
  ((i >= first && i <= last)) && [[ -z ${SKIP[${STAGES[i]}]:-} ]] && STATE[${STAGES[i]}]=waiting || STATE[${STAGES[i]}]=done
done

ready() { # every stage $1 reads is done
  for need in ${NEEDS[$1]}; do [[ ${STATE[$need]} == done ]] || return 1; done
}

stage_command() { # the command line of stage $1, into the array `cmd`
  local own
  eval "own=(${FIXED[$1]:-} ${STAGE_ARGS[$1]:-})"
  if [[ $1 == notebook ]]; then # the notebook reads RLHF_WORK_DIR; ipc: no warning about unencrypted TCP
    cmd=(env "RLHF_WORK_DIR=$work_dir" "$PYTHON" -m jupyter nbconvert --to notebook --execute
      --KernelManager.transport=ipc "${SCRIPT[$1]}" --output-dir "$work_dir" "${own[@]}")
  else
    cmd=("$PYTHON" "${SCRIPT[$1]}" "${common[@]}" "${own[@]}")
  fi
}

launch() { # start stage $1: in the foreground when $2 is "fg", else into its log
  local stage=$1 cmd shown
  stage_command "$stage"
  shown=${cmd[*]} shown=${shown#"$PYTHON "}
  local xlsx=$work_dir/rlhf_eval_results_with_base.xlsx flags=${common[*]}
  if [[ $stage == notebook && ! -f $xlsx && $PYTHON != echo ]]; then
    die "notebook: $xlsx not found: make it first with \`bash run_pipeline.sh ${flags:+$flags }--only eval\`"
  fi
  if [[ $stage == gold && ! -d $work_dir/processed_data/gold_train && $PYTHON != echo ]]; then
    echo "== gold: skipped ($work_dir/processed_data has no gold_train split: data_process.py --gold_share F makes one)"
    STATE[$stage]=done
    return
  fi
  T0[$stage]=$(date +%s) STATE[$stage]=running
  if [[ $2 == fg ]]; then
    echo "== $shown"
    local threads=() # alone, with every job's core (tiny) or as the caller set it
    [[ -z $alone_threads ]] || threads=(env "OMP_NUM_THREADS=$alone_threads")
    "${threads[@]}" "${cmd[@]}"
    finish "$stage"
  else
    mkdir -p "$work_dir/logs"
    local device=() taken
    if ((${#devices[@]})); then # the first named device no running stage holds
      taken=" "
      for s in "${!DEVICE[@]}"; do [[ ${STATE[$s]} != running ]] || taken+="${DEVICE[$s]} "; done
      for d in "${devices[@]}"; do [[ $taken == *" $d "* ]] || { DEVICE[$stage]=$d && break; }; done
      device=(env "CUDA_VISIBLE_DEVICES=${DEVICE[$stage]}")
    fi
    echo "== $shown  (beside another stage${device:+ on CUDA device ${DEVICE[$stage]}}; log: $work_dir/logs/$stage.log)"
    TQDM_MININTERVAL=${TQDM_MININTERVAL:-30} "${device[@]}" "${cmd[@]}" >"$work_dir/logs/$stage.log" 2>&1 &
    PID[$stage]=$!
  fi
}

finish() {
  STATE[$1]=done
  echo "== $1 (${SCRIPT[$1]}) done in $(($(date +%s) - T0[$1])) s"
}

# Ctrl-C or a kill reaches this script, not the stages beside it (a script's background jobs ignore
# SIGINT): stop them too, so that no stage goes on writing into the work dir behind a rerun's back.
stop_stages() {
  local stopped=()
  for stage in "${!PID[@]}"; do
    [[ ${STATE[$stage]} == running ]] && kill "${PID[$stage]}" 2>/dev/null && stopped+=("$stage")
  done
  wait
  echo "run_pipeline.sh: interrupted; stopped ${stopped[*]:-no stage} (rerun with --from STAGE; what each one said:)" >&2
  for stage in "${stopped[@]}"; do # its own last line: whether --STAGE.resume has a checkpoint to continue
    echo "  $stage: $(tail -n 1 "$work_dir/logs/$stage.log")" >&2
  done
  exit 130
}
trap stop_stages INT TERM

start=$(date +%s)
while :; do
  running=() startable=()
  for stage in "${STAGES[@]}"; do
    [[ ${STATE[$stage]} == running ]] && running+=("$stage")
    [[ ${STATE[$stage]} == waiting ]] && ready "$stage" && startable+=("$stage")
  done
  ((${#running[@]} + ${#startable[@]})) || break
  if ((${#running[@]} == 0 && (${#startable[@]} == 1 || jobs == 1))); then
    launch "${startable[0]}" fg # alone: live output
    continue
  fi
  for stage in "${startable[@]}"; do
    ((${#running[@]} < jobs)) || break
    launch "$stage" bg
    [[ ${STATE[$stage]} == running ]] && running+=("$stage")
  done
  ((${#running[@]})) || continue
  pids=()
  for stage in "${running[@]}"; do pids+=("${PID[$stage]}"); done
  status=0
  wait -n -p ended "${pids[@]}" || status=$?
  for stage in "${running[@]}"; do
    [[ ${PID[$stage]} == "$ended" ]] || continue
    if ((status)); then
      tail -n 20 "$work_dir/logs/$stage.log" >&2
      echo "run_pipeline.sh: $stage (${SCRIPT[$stage]}) failed with status $status: its log is $work_dir/logs/$stage.log" >&2
      for other in "${running[@]}"; do [[ $other == "$stage" ]] || kill "${PID[$other]}" 2>/dev/null || true; done
      wait
      exit "$status"
    fi
    tail -n 1 "$work_dir/logs/$stage.log"
    finish "$stage"
  done
done
echo "== pipeline done in $(($(date +%s) - start)) s"
