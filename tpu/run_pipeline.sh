#!/usr/bin/env bash
# Runs the paper's ImageNet recipe stage by stage on the TPU VM: the B7
# teacher, three iterations of predict -> select -> L2 student (unlabel_ratio
# 14, 14, 28), the 800-px fine-tune, evaluation and export, all in gs://.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

STEPS=(teacher predict1 select1 student1 predict2 select2 student2
  predict3 select3 student3 finetune eval export)

usage() {
  cat <<USAGE
Usage: tpu/run_pipeline.sh --bucket=NAME [options]

The ImageNet recipe of flags/imagenet/*.cfg, one stage after another through
tpu/run_stage.sh (training on worker 0, prediction on every host), with every
path in gs://BUCKET. The flagfiles hold the recipe; this script overrides
their gs://YOUR_BUCKET placeholders:
  WORKDIR/teacher_b7                 ns-train   teacher_b7.cfg
  WORKDIR/iteration{r}/predict       ns-predict predict.cfg (teacher: the
                                                previous model)
  WORKDIR/iteration{r}/select        ns-select  select.cfg
  WORKDIR/iteration{r}/student_l2    ns-train   student_l2_iteration{r}.cfg
  WORKDIR/finetune_l2_800            ns-train   finetune_l2_800.cfg
  WORKDIR/eval, WORKDIR/export       ns-eval, ns-export
Steps: ${STEPS[*]}.
Every stage resumes when rerun (training from its last checkpoint,
prediction from its last complete file); --from skips finished steps.
A workdir with the folders' old names (round{r}/, before they were named
after the paper's iterations) is refused: rename them first, e.g.
gcloud storage mv WORKDIR/round1 WORKDIR/iteration1.

  --workdir=GS_PATH       default: gs://BUCKET/noisy-student/imagenet
  --data_dir=GS_PATH      TFDS folder holding imagenet2012 (default:
                          gs://BUCKET/tensorflow_datasets)
  --unlabeled=SPEC        unlabeled images (default:
                          folder:gs://BUCKET/unlabeled; the paper: JFT-300M)
  --from=STEP, --to=STEP  run only the steps from..to (default: all)
  --flags_dir=DIR         the recipe's flagfiles (default: flags/imagenet)

${NS_COMMON_USAGE}

Example (prints the 13 stages for a 4-host v4-32 slice):
  tpu/run_pipeline.sh --bucket=my-bucket --accelerator_type=v4-32 --dry_run
USAGE
}

workdir=""
data_dir=""
unlabeled=""
from="${STEPS[0]}"
to="${STEPS[${#STEPS[@]} - 1]}"
flags_dir="flags/imagenet"
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --workdir=*) workdir="${1#*=}" ;;
    --data_dir=*) data_dir="${1#*=}" ;;
    --unlabeled=*) unlabeled="${1#*=}" ;;
    --from=*) from="${1#*=}" ;;
    --to=*) to="${1#*=}" ;;
    --flags_dir=*) flags_dir="${1#*=}" ;;
    *) ns_parse_common_option "$1" || { usage >&2; ns_die "Expected an option listed above. Received: $1"; } ;;
  esac
  shift
done
ns_finalize
ns_require_bucket
workdir="${workdir:-gs://${BUCKET}/noisy-student/imagenet}"
workdir="${workdir%/}"
data_dir="${data_dir:-gs://${BUCKET}/tensorflow_datasets}"
unlabeled="${unlabeled:-folder:gs://${BUCKET}/unlabeled}"
if [[ "$workdir" != gs://* ]]; then
  ns_die "Expected a gs:// --workdir (every host and stage reads it). Received: workdir=${workdir}"
fi

step_index() {
  local i
  for i in "${!STEPS[@]}"; do
    if [[ "${STEPS[$i]}" == "$1" ]]; then
      echo "$i"
      return 0
    fi
  done
  ns_die "Expected a step in: ${STEPS[*]}. Received: $2=$1"
}
first="$(step_index "$from" from)"
last="$(step_index "$to" to)"
if ((first > last)); then
  ns_die "Expected --from before --to. Received: from=${from}, to=${to}"
fi
for name in teacher_b7 predict select student_l2_iteration1 \
  student_l2_iteration2 student_l2_iteration3 finetune_l2_800; do
  if [[ ! -f "${NS_REPO_ROOT}/${flags_dir}/${name}.cfg" ]]; then
    ns_die "Expected the flagfile ${flags_dir}/${name}.cfg in the repository. Received: flags_dir=${flags_dir}"
  fi
done

# Runs step "$1" (a stage command and its flags follow) when in from..to.
step() {
  local index
  index="$(step_index "$1" step)"
  shift
  if ((index >= first && index <= last)); then
    ns_note "step ${STEPS[$index]}"
    ns_stage "$@"
  fi
}

# The folders' names before the round -> iteration rename: refused, since
# the stages would start afresh in iteration{r}/ beside them (a dry run
# prints the check only).
for iteration in 1 2 3; do
  old="${workdir}/round${iteration}"
  if [[ "$DRY_RUN" == 1 ]]; then
    ns_note "check: no ${old}/ (the folder's name before iteration${iteration}/)"
  elif gcloud storage ls "${old}/" >/dev/null 2>&1; then
    ns_die "Expected iteration${iteration}/, not round${iteration}/, in ${workdir} (the work folders are named after the paper's iterations). Received: ${old}; rename it first: gcloud storage mv ${old} ${workdir}/iteration${iteration}"
  fi
done

ns_note "ImageNet recipe on ${TPU_NAME} (${ACCELERATOR_TYPE}, ${NUM_WORKERS} host(s)) in ${workdir}"
teacher="${workdir}/teacher_b7"
step teacher ns-train "--flagfile=${flags_dir}/teacher_b7.cfg" \
  "--data_dir=${data_dir}" "--model_dir=${teacher}"
for iteration in 1 2 3; do
  dir="${workdir}/iteration${iteration}"
  step "predict${iteration}" ns-predict "--flagfile=${flags_dir}/predict.cfg" \
    "--data_dir=${data_dir}" "--unlabeled=${unlabeled}" \
    "--teacher=${teacher}" "--out_dir=${dir}/predict"
  step "select${iteration}" ns-select "--flagfile=${flags_dir}/select.cfg" \
    "--pred_dir=${dir}/predict" "--out_dir=${dir}/select"
  step "student${iteration}" ns-train \
    "--flagfile=${flags_dir}/student_l2_iteration${iteration}.cfg" \
    "--data_dir=${data_dir}" "--pseudo_labels=${dir}/select" \
    "--model_dir=${dir}/student_l2"
  teacher="${dir}/student_l2"
done
final="${workdir}/finetune_l2_800"
step finetune ns-train "--flagfile=${flags_dir}/finetune_l2_800.cfg" \
  "--data_dir=${data_dir}" "--init_from=${teacher}" "--model_dir=${final}"
step eval ns-eval "--model_path=${final}" --labeled=tfds:imagenet2012:train \
  --test=tfds:imagenet2012:validation "--data_dir=${data_dir}" \
  "--out_dir=${workdir}/eval"
step export ns-export "--model_path=${final}" "--out_dir=${workdir}/export" \
  --overwrite
