#!/usr/bin/env bash
# Multi-node WCL training under SLURM: one torchrun agent per node, c10d rendezvous on the first node.
#   sbatch --nodes 4 scripts/slurm_train.sh configs/imagenet_wcl_multicrop_200ep.yaml data.train_dir=/data/imagenet/train [key=value ...]
# Loader: DALI with nvJPEG decoding and the augmentations on the GPU (data.backend=dali; the reference PIL
# loader cannot feed 8 GPUs; BACKEND=reference|ffcv changes it). FFCV instead: convert once, then pass the file:
#   python -m pipelines.convert --src /data/imagenet/train --out /data/imagenet/train.beton --workers 32
#   sbatch --nodes 4 scripts/slurm_train.sh configs/imagenet_wcl_multicrop_200ep.yaml data.backend=ffcv \
#       data.beton=/data/imagenet/train.beton data.val_dir=/data/imagenet/val
# Requeue-safe: resume=auto continues from out_dir/checkpoint.pt (exactly, see README); SIGTERM before the
# time limit makes every rank stop at the next log interval and write a checkpoint.
#SBATCH --job-name=wcl-fast
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=TERM@300
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail
CONFIG="${1:?usage: sbatch scripts/slurm_train.sh configs/<experiment>.yaml [key=value ...]}"
shift
GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
HEAD_NODE="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
PORT="${MASTER_PORT:-29500}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
echo "wcl-fast: $SLURM_NNODES nodes x $GPUS_PER_NODE GPUs, rendezvous $HEAD_NODE:$PORT, job $SLURM_JOB_ID, loader ${BACKEND:-dali}"
# --kill-on-bad-exit: a failed node ends the step; --max-restarts lets torchrun restart the group
# after a worker failure (it resumes from the last checkpoint).
srun --kill-on-bad-exit=1 --ntasks-per-node=1 \
    python -m torch.distributed.run \
        --nnodes "$SLURM_NNODES" --nproc_per_node "$GPUS_PER_NODE" \
        --rdzv_backend c10d --rdzv_endpoint "$HEAD_NODE:$PORT" --rdzv_id "$SLURM_JOB_ID" \
        --max-restarts "${MAX_RESTARTS:-3}" \
        -m wcl_fast.train --config "$CONFIG" train.resume=auto "data.backend=${BACKEND:-dali}" "$@"
