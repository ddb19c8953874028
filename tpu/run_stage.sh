#!/usr/bin/env bash
# Runs one stage command on the TPU VM with the slice's TPU flags, e.g.
#   tpu/run_stage.sh ns-train --flagfile=flags/imagenet/teacher_b7.cfg
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
Usage: tpu/run_stage.sh [options] COMMAND [COMMAND_FLAGS...]

Runs COMMAND (noisy-student, ns-train, ns-predict, ns-select, ns-eval or
ns-export) with COMMAND_FLAGS on the TPU VM, from ~/${REMOTE_DIR} (flagfile
paths like flags/imagenet/teacher_b7.cfg resolve there) in the venv
~/${REMOTE_VENV}:
  ns-train, noisy-student   on worker 0, with --strategy=tpu and --tpu=local
                            (one host) or --tpu=TPU_NAME and
                            TPU_LOAD_LIBRARY=0 (a pod slice: one TensorFlow
                            client on worker 0 drives every host);
  ns-predict                on every host at once, host i with
                            --shard_index=i --num_shards=NUM_WORKERS (disjoint
                            parts of the unlabeled set, one shared --out_dir);
  ns-select/eval/export     on worker 0.
Work directories should be gs:// paths: every host and every later stage
reads them. Each stage resumes when rerun.

${NS_COMMON_USAGE}

Examples:
  tpu/run_stage.sh --accelerator_type=v4-32 --dry_run ns-predict \\
      --flagfile=flags/imagenet/predict.cfg
  tpu/run_stage.sh noisy-student --flagfile=flags/svhn.cfg \\
      --workdir=gs://my-bucket/noisy-student/svhn \\
      --data_dir=gs://my-bucket/tensorflow_datasets --precision=bfloat16
USAGE
}

while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    -*) ns_parse_common_option "$1" || { usage >&2; ns_die "Expected an option listed above before COMMAND. Received: $1"; } ;;
    *) break ;;
  esac
  shift
done
if (($# == 0)); then
  usage >&2
  ns_die "Expected a COMMAND after the options. Received: nothing"
fi
ns_finalize
ns_stage "$@"
