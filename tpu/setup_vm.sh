#!/usr/bin/env bash
# Installs noisy-student (with TensorFlow for TPU) on every host of the TPU
# VM, from a wheel built here or from a git URL.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
Usage: tpu/setup_vm.sh [options] [--git_url=URL [--git_ref=REF]]

Puts the repository's flags/ and tpu/ plus the package on every host of the
TPU VM (gcloud ... --worker=all) under ~/${REMOTE_DIR}, then runs
tpu/vm_install.sh there: a venv ~/${REMOTE_VENV} with the package and
tensorflow-tpu==TF_VERSION in place of the CPU tensorflow.

  (default)               build a wheel of this checkout (pip wheel), copy it
                          with flags/ and tpu/ to every host (gcloud scp)
  --git_url=URL           instead, clone URL on every host (the hosts need
                          access to it) ...
  --git_ref=REF           ... and check out REF (branch, tag or commit)

${NS_COMMON_USAGE}

Example:
  tpu/setup_vm.sh --tpu_name=ns --accelerator_type=v4-32 --dry_run
USAGE
}

git_url=""
git_ref=""
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --git_url=*) git_url="${1#*=}" ;;
    --git_ref=*) git_ref="${1#*=}" ;;
    *) ns_parse_common_option "$1" || { usage >&2; ns_die "Expected an option listed above. Received: $1"; } ;;
  esac
  shift
done
ns_finalize
if [[ -n "$git_ref" && -z "$git_url" ]]; then
  ns_die "Expected --git_url with --git_ref. Received: git_ref=${git_ref}, git_url=''"
fi

install="bash ${REMOTE_DIR}/tpu/vm_install.sh $(ns_quote "--package=${REMOTE_DIR}" \
  "--venv=${REMOTE_VENV}" "--tf_version=${TF_VERSION}")"
ns_note "installing on ${NUM_WORKERS} host(s) of ${TPU_NAME}"
if [[ -n "$git_url" ]]; then
  fetch="rm -rf ${REMOTE_DIR} && git clone $(ns_quote "$git_url" "$REMOTE_DIR")"
  if [[ -n "$git_ref" ]]; then
    fetch+=" && git -C ${REMOTE_DIR} checkout $(ns_quote "$git_ref")"
  fi
  ns_ssh all "${fetch} && ${install}"
  exit 0
fi

# A bundle of the wheel, flags/ and tpu/: one copy per host.
bundle_dir="${TMPDIR:-/tmp}/noisy-student-tpu"
bundle="${bundle_dir}.tgz"
ns_run rm -rf "$bundle_dir"
ns_run python3 -m pip wheel --quiet --no-deps --wheel-dir "${bundle_dir}/dist" "$NS_REPO_ROOT"
ns_run tar -czf "$bundle" -C "$NS_REPO_ROOT" flags tpu -C "$bundle_dir" dist
ns_run gcloud compute tpus tpu-vm scp "$bundle" "${TPU_NAME}:${REMOTE_DIR}.tgz" \
  "${NS_LOCATION[@]}" --worker=all
ns_ssh all "rm -rf ${REMOTE_DIR} && mkdir -p ${REMOTE_DIR} && tar -xzf ${REMOTE_DIR}.tgz -C ${REMOTE_DIR} && ${install}"
