# shellcheck shell=bash
# Shared by the tpu/*.sh scripts (sourced, never run): the settings, the
# options every script accepts, the dry-run switch and the gcloud calls.
#
# Settings come from environment variables of the same name, and the
# command-line options override them:
#   PROJECT           Google Cloud project (empty: gcloud's configured one)
#   ZONE              zone of the TPU VM
#   TPU_NAME          name of the TPU VM
#   ACCELERATOR_TYPE  e.g. v4-8 (one host) or v4-32 (a pod slice of 4 hosts)
#   RUNTIME_VERSION   TPU VM image (empty: the base image of the generation)
#   BUCKET            Cloud Storage bucket of the data and work directories
#   NUM_WORKERS       hosts of the slice (empty: from ACCELERATOR_TYPE)
#   TF_VERSION        tensorflow-tpu release installed on the VM
#   DRY_RUN           1: print the commands instead of running them
# With --dry_run every command (gcloud, the local build, the remote command
# lines) is printed as one shell-quoted line, so the output is itself a
# runnable script; nothing is executed.

# shellcheck disable=SC2034  # Used by the scripts that source this file.
NS_REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NS_SCRIPT="$(basename "$0")"

PROJECT="${PROJECT:-}"
ZONE="${ZONE:-us-central2-b}"
TPU_NAME="${TPU_NAME:-noisy-student}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-8}"
RUNTIME_VERSION="${RUNTIME_VERSION:-}"
BUCKET="${BUCKET:-}"
NUM_WORKERS="${NUM_WORKERS:-}"
TF_VERSION="${TF_VERSION:-2.18.0}"
DRY_RUN="${DRY_RUN:-0}"
# On the VM, relative to the login directory: the unpacked repository
# (flags/ and tpu/ live there) and the virtual environment.
REMOTE_DIR="${REMOTE_DIR:-noisy-student}"
REMOTE_VENV="${REMOTE_VENV:-ns-venv}"

# shellcheck disable=SC2034  # Used by the scripts that source this file.
NS_COMMON_USAGE="Options shared by the tpu/ scripts (environment variable in brackets):
  --project=ID            Google Cloud project [PROJECT] (default: gcloud's)
  --zone=ZONE             zone of the TPU VM [ZONE] (default: us-central2-b)
  --tpu_name=NAME         TPU VM name [TPU_NAME] (default: noisy-student)
  --accelerator_type=T    e.g. v4-8, v3-32, v5litepod-16 [ACCELERATOR_TYPE]
                          (default: v4-8, one host)
  --runtime_version=V     TPU VM image [RUNTIME_VERSION] (default: the base
                          image of the TPU generation, e.g. tpu-ubuntu2204-base)
  --bucket=NAME           bucket of data and work dirs, with or without gs://
                          [BUCKET]
  --num_workers=N         hosts of the slice [NUM_WORKERS] (default: from the
                          accelerator type: v2/v3/v4/v5p 8 cores per host,
                          v5litepod/v6e 4 chips per host beyond 8 chips)
  --tf_version=V          tensorflow-tpu release to install [TF_VERSION]
                          (default: 2.18.0)
  --dry_run               print the commands (gcloud included), run nothing
  -h, --help              this message"

# Prints an error in the house style and exits with the usage-error status.
ns_die() {
  echo "${NS_SCRIPT}: $*" >&2
  exit 2
}

# Consumes one shared option; returns 1 when "$1" is not one of them.
ns_parse_common_option() {
  case "$1" in
    --project=*) PROJECT="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --tpu_name=*) TPU_NAME="${1#*=}" ;;
    --accelerator_type=*) ACCELERATOR_TYPE="${1#*=}" ;;
    --runtime_version=*) RUNTIME_VERSION="${1#*=}" ;;
    --bucket=*) BUCKET="${1#*=}" ;;
    --num_workers=*) NUM_WORKERS="${1#*=}" ;;
    --tf_version=*) TF_VERSION="${1#*=}" ;;
    --dry_run) DRY_RUN=1 ;;
    *) return 1 ;;
  esac
}

# Hosts of a slice: v2/v3/v4/v5p name TensorCores (8 per host); v5e and v6e
# name chips (single-host slices up to 8 chips, then 4 chips per host).
ns_hosts_of() {
  local type="$1" generation count
  if [[ ! "$type" =~ ^(v[0-9]+[a-z]*)-([0-9]+)$ ]]; then
    ns_die "Expected --accelerator_type like v4-8 or v4-32. Received: accelerator_type=${type}"
  fi
  generation="${BASH_REMATCH[1]}"
  count="${BASH_REMATCH[2]}"
  case "$generation" in
    v2 | v3 | v4 | v5p) echo $((count > 8 ? count / 8 : 1)) ;;
    v5litepod | v5e | v6e) echo $((count > 8 ? count / 4 : 1)) ;;
    *) ns_die "Expected a TPU generation v2, v3, v4, v5p, v5litepod or v6e (or --num_workers). Received: accelerator_type=${type}" ;;
  esac
}

# The TPU VM base image of a generation (TensorFlow is pip-installed on it).
ns_default_runtime() {
  case "${1%%-*}" in
    v5litepod | v5e) echo "v2-alpha-tpuv5-lite" ;;
    v5p) echo "v2-alpha-tpuv5" ;;
    v6e) echo "v2-alpha-tpuv6e" ;;
    *) echo "tpu-ubuntu2204-base" ;;
  esac
}

# Checks the settings and fills in the derived ones; call after parsing.
ns_finalize() {
  local hosts
  hosts="$(ns_hosts_of "$ACCELERATOR_TYPE")"
  if [[ -z "$NUM_WORKERS" ]]; then
    NUM_WORKERS="$hosts"
  elif [[ ! "$NUM_WORKERS" =~ ^[1-9][0-9]*$ ]]; then
    ns_die "Expected --num_workers to be a positive integer. Received: num_workers=${NUM_WORKERS}"
  fi
  if [[ -z "$RUNTIME_VERSION" ]]; then
    RUNTIME_VERSION="$(ns_default_runtime "$ACCELERATOR_TYPE")"
  fi
  if [[ ! "$TPU_NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]]; then
    ns_die "Expected --tpu_name of lower-case letters, digits and dashes. Received: tpu_name=${TPU_NAME}"
  fi
  BUCKET="${BUCKET#gs://}"
  BUCKET="${BUCKET%/}"
  NS_LOCATION=("--zone=${ZONE}")
  if [[ -n "$PROJECT" ]]; then
    NS_LOCATION+=("--project=${PROJECT}")
  fi
}

ns_require_bucket() {
  if [[ -z "$BUCKET" || "$BUCKET" == */* ]]; then
    ns_die "Expected --bucket=NAME (or BUCKET=NAME), a Cloud Storage bucket for the data and work directories. Received: bucket='${BUCKET}'"
  fi
}

# Prints its arguments as one line of shell words, quoting only where needed
# so that dry-run output stays readable and can be pasted into a shell.
ns_quote() {
  local word out="" safe='^[-A-Za-z0-9_./:=,@%+]+$'
  for word in "$@"; do
    if [[ "$word" =~ $safe ]]; then
      out+="${word} "
    else
      out+="'${word//\'/\'\\\'\'}' "
    fi
  done
  printf '%s' "${out% }"
}

# Runs a command, or prints it under --dry_run.
ns_run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%s\n' "$(ns_quote "$@")"
  else
    "$@"
  fi
}

# A progress note: a shell comment on stdout under --dry_run, else stderr.
ns_note() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '# %s\n' "$*"
  else
    printf '[%s] %s\n' "$NS_SCRIPT" "$*" >&2
  fi
}

NS_PIDS=()

# Runs a command in the background (printed with a trailing & under
# --dry_run); ns_wait collects them all.
ns_run_bg() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%s &\n' "$(ns_quote "$@")"
  else
    "$@" &
    NS_PIDS+=("$!")
  fi
}

# Waits for every ns_run_bg command; fails if any of them failed.
ns_wait() {
  local pid failed=0
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "wait"
    return 0
  fi
  for pid in "${NS_PIDS[@]}"; do
    wait "$pid" || failed=1
  done
  NS_PIDS=()
  if ((failed)); then
    echo "${NS_SCRIPT}: at least one worker failed; rerun the same command to resume" >&2
    return 1
  fi
}

# The gcloud command that runs a shell command line on TPU VM worker(s)
# "$1" (an index or "all").
ns_ssh_command() {
  local worker="$1" command="$2"
  NS_SSH=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${NS_LOCATION[@]}"
    "--worker=${worker}" "--command=${command}")
}

ns_ssh() {
  ns_ssh_command "$1" "$2"
  ns_run "${NS_SSH[@]}"
}

ns_ssh_bg() {
  ns_ssh_command "$1" "$2"
  ns_run_bg "${NS_SSH[@]}"
}

# The start of every remote command line: the venv and the repository.
ns_remote_prefix() {
  printf '. %s/bin/activate && cd %s' "$REMOTE_VENV" "$REMOTE_DIR"
}

# Runs one stage command (noisy-student, ns-train, ns-predict, ns-select,
# ns-eval, ns-export) with its flags on the TPU VM:
#   - training (ns-train, noisy-student) gets --strategy=tpu: on one host
#     with --tpu=local; on a pod slice one TensorFlow client on worker 0
#     drives every host, so it runs there with --tpu=TPU_NAME and
#     TPU_LOAD_LIBRARY=0 (the client does not claim the local chips itself);
#   - ns-predict runs on every host at once, host i with --shard_index=i
#     --num_shards=NUM_WORKERS: the hosts label disjoint parts of the
#     unlabeled set into the same gs:// folder, and a rerun redoes only
#     unfinished files;
#   - ns-select, ns-eval and ns-export run on worker 0.
# The added flags come last, so they override the flagfile's.
ns_stage() {
  local command="$1" env="" i
  shift
  local args=("$@")
  case "$command" in
    noisy-student | ns-train | ns-predict | ns-select | ns-eval | ns-export) ;;
    *) ns_die "Expected a stage command noisy-student, ns-train, ns-predict, ns-select, ns-eval or ns-export. Received: command=${command}" ;;
  esac
  if [[ "$command" == ns-train || "$command" == noisy-student ]]; then
    if ((NUM_WORKERS > 1)); then
      env="export TPU_LOAD_LIBRARY=0 && "
      args+=(--strategy=tpu "--tpu=${TPU_NAME}")
    else
      args+=(--strategy=tpu --tpu=local)
    fi
  fi
  if [[ "$command" == ns-predict ]]; then
    for ((i = 0; i < NUM_WORKERS; i++)); do
      ns_ssh_bg "$i" "$(ns_remote_prefix) && ${command} $(ns_quote "${args[@]}" \
        "--shard_index=${i}" "--num_shards=${NUM_WORKERS}")"
    done
    ns_wait
  else
    ns_ssh 0 "$(ns_remote_prefix) && ${env}${command} $(ns_quote "${args[@]}")"
  fi
}
