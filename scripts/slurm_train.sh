#!/usr/bin/env bash
# Multi-node WCL training under SLURM: one torchrun agent per node, c10d rendezvous on the first node.
#   sbatch --nodes 4 scripts/slurm_train.sh configs/imagenet_wcl_multicrop_200ep.yaml data.train_dir=/data/imagenet/train [key=value ...]
# Loader: DALI with nvJPEG decoding and the augmentations on the GPU (data.backend=dali; the reference PIL
# loader cannot feed 8 GPUs; BACKEND=reference|ffcv changes it). FFCV instead: convert once, then pass the file:
#   python -m pipelines.convert --src /data/imagenet/train --out /data/imagenet/train.beton --workers 32
#   sbatch --nodes 4 scripts/slurm_train.sh configs/imagenet_wcl_multicrop_200ep.yaml data.backend=ffcv \
#       data.beton=/data/imagenet/train.beton data.val_dir=/data/imagenet/val
# Time limits: SLURM sends SIGUSR1 to this batch shell 300 s before the limit (--signal=B:USR1@300; the lead
# must cover one step, the checkpoint write and the stop's one-step agreement: a minute or two for ResNet-50
# at 512 per GPU). The shell passes it on to the job step as SIGTERM; torchrun's agents forward it to the
# workers, which write a checkpoint at the next step boundary, and rank 0 calls `scontrol requeue`: the same
# job starts again and train.resume=auto continues exactly (docs/running.md). Node failures and preemption
# requeue through --requeue.
#SBATCH --job-name=wcl-fast
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
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
        -m wcl_fast.train --config "$CONFIG" train.resume=auto "data.backend=${BACKEND:-dali}" "$@" &
SRUN_PID=$!
# the time limit's SIGUSR1 (or a scancel --signal=TERM --batch): the job step gets SIGTERM (see the top)
trap 'echo "wcl-fast: stop signal: checkpoint at the next step, then requeue"; kill -TERM "$SRUN_PID" 2>/dev/null' USR1 TERM
set +e
wait "$SRUN_PID"
rc=$?
while kill -0 "$SRUN_PID" 2>/dev/null; do  # wait was interrupted by the trap: wait for the step to end
  wait "$SRUN_PID"
  rc=$?
done
exit "$rc"
