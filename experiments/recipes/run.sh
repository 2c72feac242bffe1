#!/usr/bin/env bash
# Launch one stage of the Mistral-7B-32K recipe on a node of 8 devices (NPU/GPU), or several nodes.
#   bash experiments/recipes/run.sh convert_hf2mg_tp8|preprocess_pretrain|preprocess_finetune|pretrain_tp8|
#                                   finetune_tp8|generate_tp8|evaluate_mmlu_tp8|convert_mg2hf  [extra --flags]
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR (and MASTER_PORT) on every node, as the seed's scripts do.
# On Ascend, `source <CANN>/set_env.sh` first; the device (npu > cuda > cpu) and backend are picked automatically.
set -euo pipefail
stage=${1:?usage: run.sh STAGE [extra flags]}; shift
here=$(cd "$(dirname "$0")" && pwd)
flagfile="$here/$stage.flags"
[ -f "$flagfile" ] || { echo "error: no recipe $stage ($flagfile)" >&2; exit 2; }

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
PYTHON=${PYTHON:-python}

case "$stage" in
  convert_*)    module=experiments.convert_ckpt ;;
  preprocess_*) module=experiments.preprocess_data ;;
  pretrain_*|finetune_*) module=experiments.pretrain ;;
  generate_*)   module=experiments.generate ;;
  evaluate_*)   module=experiments.evaluate ;;
  *) echo "error: unknown stage $stage" >&2; exit 2 ;;
esac

case "$stage" in
  convert_*|preprocess_*) exec "$PYTHON" -m "$module" --flagfile="$flagfile" "$@" ;;
  *) exec "$PYTHON" -m torch.distributed.run --nproc_per_node="$GPUS_PER_NODE" --nnodes="$NNODES" \
       --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
       -m "$module" --flagfile="$flagfile" "$@" ;;
esac
