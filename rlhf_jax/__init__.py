"""rlhf_jax: post-training language models (SFT, reward models, DPO, PPO, GRPO) in JAX."""

# Exit status of `rlhf-jax train` (and `rlhf-jax sweep`) when a SIGTERM (preemption
# notice, `scancel`, tpu_scripts/stop.sh) stopped the run before config.num_steps: a
# checkpoint of the last finished step was saved; re-run the same command to resume.
# 75 = EX_TEMPFAIL (sysexits.h, "temporary failure, retry"): launchers re-queue on it
# (tpu_scripts/watch.sh, slurm_train.sbatch), a sweep marks the job "interrupted".
EXIT_PREEMPTED = 75
