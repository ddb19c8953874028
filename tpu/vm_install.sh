#!/usr/bin/env bash
# Runs ON a TPU VM host (tpu/setup_vm.sh calls it on every host): makes a
# venv with noisy-student and TensorFlow for TPU.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
Usage: bash tpu/vm_install.sh [--package=DIR] [--venv=DIR] [--tf_version=V] [--dry_run]

Creates the venv DIR (default: ~/${REMOTE_VENV}) and installs the package
from DIR/dist/*.whl when there is one (the bundle of tpu/setup_vm.sh), else
from the source tree DIR (a git clone; default: this script's repository).
noisy-student depends on the CPU build "tensorflow"; it is installed at
TF_VERSION to resolve every other dependency, then replaced by the TPU build
"tensorflow-tpu" of the same version from Google's libtpu index (the same
Python module, with libtpu).

  --package=DIR           repository (or unpacked bundle) to install
  --venv=DIR              virtual environment to create or reuse
  --tf_version=V          TensorFlow / tensorflow-tpu version (${TF_VERSION})
  --dry_run               print the commands, run nothing
USAGE
}

package="$NS_REPO_ROOT"
venv="${HOME}/${REMOTE_VENV}"
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --package=*) package="${1#*=}" ;;
    --venv=*) venv="${1#*=}" ;;
    --tf_version=*) TF_VERSION="${1#*=}" ;;
    --dry_run) DRY_RUN=1 ;;
    *) usage >&2; ns_die "Expected an option listed above. Received: $1" ;;
  esac
  shift
done
if [[ ! -d "$package" ]]; then
  ns_die "Expected --package to be a folder (a clone or an unpacked bundle). Received: package=${package}"
fi
target="$package"
for wheel in "$package"/dist/*.whl; do
  if [[ -f "$wheel" ]]; then
    target="$wheel"
  fi
done

# TPU VM base images ship Python 3.10 without the venv module.
if [[ "$DRY_RUN" == 1 ]] || ! python3 -c "import ensurepip" 2>/dev/null; then
  ns_run sudo apt-get update -qq
  ns_run sudo apt-get install -y -qq python3-venv
fi
ns_run python3 -m venv "$venv"
ns_run "${venv}/bin/pip" install --quiet --upgrade pip
ns_run "${venv}/bin/pip" install --quiet "$target" "tensorflow==${TF_VERSION}"
ns_run "${venv}/bin/pip" uninstall --yes --quiet tensorflow
ns_run "${venv}/bin/pip" install --quiet "tensorflow-tpu==${TF_VERSION}" \
  --find-links=https://storage.googleapis.com/libtpu-tf-releases/index.html
ns_run "${venv}/bin/python" -c "import noisy_student, tensorflow as tf; print('noisy_student with TensorFlow', tf.__version__)"
