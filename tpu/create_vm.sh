#!/usr/bin/env bash
# Creates the TPU VM (one host or a pod slice) that the other tpu/ scripts
# use; with --delete, deletes it.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
Usage: tpu/create_vm.sh [options] [--spot] [--delete]

Creates the TPU VM TPU_NAME in ZONE with ACCELERATOR_TYPE and the runtime
image RUNTIME_VERSION (gcloud compute tpus tpu-vm create). Next:
tpu/setup_vm.sh installs the package on every host.

  --spot                  a Spot VM (cheaper, can be preempted; every stage
                          resumes when rerun)
  --delete                delete the TPU VM instead

${NS_COMMON_USAGE}

Example:
  tpu/create_vm.sh --project=my-project --zone=us-central2-b \\
      --tpu_name=ns --accelerator_type=v4-32 --dry_run
USAGE
}

spot=0
delete=0
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --spot) spot=1 ;;
    --delete) delete=1 ;;
    *) ns_parse_common_option "$1" || { usage >&2; ns_die "Expected an option listed above. Received: $1"; } ;;
  esac
  shift
done
ns_finalize

if ((delete)); then
  ns_note "deleting TPU VM ${TPU_NAME} (${ZONE})"
  ns_run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${NS_LOCATION[@]}" --quiet
  exit 0
fi
ns_note "TPU VM ${TPU_NAME}: ${ACCELERATOR_TYPE}, ${NUM_WORKERS} host(s), image ${RUNTIME_VERSION}"
create=(gcloud compute tpus tpu-vm create "$TPU_NAME" "${NS_LOCATION[@]}"
  "--accelerator-type=${ACCELERATOR_TYPE}" "--version=${RUNTIME_VERSION}")
if ((spot)); then
  create+=(--spot)
fi
ns_run "${create[@]}"
