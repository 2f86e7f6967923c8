"""Command line: `rlhf-jax <command> ...` (also `python -m rlhf_jax.launch ...`).

  rlhf-jax train --config=configs/sft.py:tiny --workdir=DIR [--config.KEY=VALUE ...]
      Validate the config, write DIR/config.json, train (resuming from
      DIR/checkpoints if present). Exit 0 when config.num_steps are done. SIGTERM
      (preemption) saves a checkpoint at the end of the current step and exits 75
      (EXIT_PREEMPTED, "temporary failure, retry"): re-run the same command to resume.
  rlhf-jax import SRC OUT_DIR
      Convert a Hugging Face directory or a .gguf file to our checkpoint format.
  rlhf-jax eval-rm --checkpoint=RM_WORKDIR --data=PAIRS.jsonl [--format=jsonl|hh_rlhf]
                   [--batch_size=32]
      Pairwise accuracy of a trained reward model on a preference file.
  rlhf-jax sweep SWEEP.py[:preset] --sweep_dir=DIR [--parallel=N] [--dry_run] [--no_report]
      Run an experiment's cells x seeds into DIR/<cell>/seed-<k>/ (finished cells are
      skipped, interrupted ones resumed), then write DIR/report/.
  rlhf-jax export WORKDIR OUT_DIR [--step=N] [--overwrite]
      Write a run's parameters (LoRA adapters merged) as a Hugging Face directory
      (config.json + model.safetensors + tokenizer) that `load_pretrained` and HF read.
  rlhf-jax label --prompts=FILE --out=DIR --judge=rm:WORKDIR|lm:WORKDIR [...]
      AI feedback: rank >= 2 candidate completions per prompt with a judge, write
      preference pairs for the RM / DPO trainers (agreement with gold labels reported).
  rlhf-jax constitution --policy=WORKDIR --constitution=FILE --prompts=FILE --out=DIR
      Constitutional AI: answer, critique against a principle, revise; SFT and
      preference records with every intermediate text.
  rlhf-jax report DIR [DIR...] [--out=DIR] [--metrics=a,b] [--gold=KEY] [--proxy=KEY] ...
      report.md + report.csv + plots (mean and 95% CI over seeds) for runs / sweeps.

The command re-executes itself once with glibc malloc tuned for XLA:CPU
(rlhf_jax/allocator.py: -20% step time on CPU); RLHF_JAX_MALLOC=system opts out.

Errors in configs, data, checkpoints or pretrained files print one line
("error: ...") naming the key / file:line / tensor; RLHF_JAX_DEBUG=1 shows the
full traceback instead.
"""
from __future__ import annotations

import importlib
import os
import signal
import sys
import threading

from rlhf_jax import EXIT_PREEMPTED

USAGE = __doc__


def _die(msg: str, code: int = 2):
  print(f"error: {msg}", file=sys.stderr)
  sys.exit(code)


def _config_arg(argv):
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def load_config(spec: str):
  """`path/to/file.py[:preset]` -> ConfigDict (`config_keys.load_config`); on the command line
  a bad path or preset prints its one-line error and exits with status 2."""
  from rlhf_jax import config as config_lib
  from rlhf_jax import config_keys
  try:
    return config_keys.load_config(spec)
  except config_lib.ConfigError as e:
    _die(str(e))


def train_command(argv):
  from absl import flags
  from ml_collections import config_flags

  from rlhf_jax import config as config_lib
  from rlhf_jax import config_keys

  if any(a in ("-h", "--help", "--helpfull") for a in argv):
    print(USAGE)
    return
  spec = _config_arg(argv)
  if spec is None:
    _die("train needs --config=configs/<algo>.py[:preset]")
  config = load_config(spec)
  try:
    config_keys.check_overrides(argv, config)
  except config_lib.ConfigError as e:
    _die(str(e))

  # A fresh flag registry per call (not absl's global FLAGS): the command can run more
  # than once in one process (tests), and overrides are found in `argv`, not sys.argv.
  fv = flags.FlagValues()
  full = ["rlhf-jax train"] + list(argv)
  config_flags.DEFINE_config_file("config", None, "Experiment config file[:preset].",
                                  flag_values=fv, sys_argv=full)
  flags.DEFINE_string("workdir", None, "Output directory (created; resumed if it has "
                      "checkpoints).", flag_values=fv)
  try:
    rest = fv(full)
  except flags.Error as e:
    _die(config_keys.explain_flag_error(str(e), config))
  if len(rest) > 1:
    _die(f"train: unexpected argument {rest[1]!r}; every setting is a --config.KEY=VALUE flag")
  if not fv.workdir:
    _die("train needs --workdir=DIR")
  if os.path.exists(fv.workdir) and not os.path.isdir(fv.workdir):
    _die(f"--workdir={fv.workdir}: exists and is not a directory")
  if not flags.FLAGS.is_parsed():  # libraries that read absl flags see the defaults
    flags.FLAGS.mark_as_parsed()
  _train(fv.config, fv.workdir)


def _train(cfg, workdir: str):
  from absl import logging as absl_logging
  absl_logging.use_absl_handler()
  absl_logging.set_verbosity(absl_logging.WARNING)
  import jax
  from rlhf_jax import parallel
  from rlhf_jax.config import ConfigError
  try:
    parallel.initialize_distributed(cfg.distributed)  # before anything touches a device
  except ValueError as e:
    _die(str(e))
  try:
    trainer = importlib.import_module(f"rlhf_jax.trainers.{cfg.trainer}")
  except ModuleNotFoundError:
    _die(f"config.trainer={cfg.trainer!r}: no module rlhf_jax/trainers/{cfg.trainer}.py")
  print(f"rlhf-jax train: trainer={cfg.trainer} workdir={workdir} "
        f"devices={jax.device_count()}x{jax.devices()[0].platform}"
        + (f" process={jax.process_index()}/{jax.process_count()}"
           if jax.process_count() > 1 else ""), flush=True)
  try:
    result = trainer.run(cfg, workdir)
  except _user_errors() as e:
    if os.environ.get("RLHF_JAX_DEBUG"):
      raise
    _die(str(e), 2 if isinstance(e, ConfigError) else 1)
  print("done: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                             for k, v in result.items()), flush=True)
  from rlhf_jax import metrics as metrics_lib
  print(metrics_lib.peak_memory_line(metrics_lib.peak_memory()), flush=True)
  if result.get("preempted"):  # stopped by SIGTERM before num_steps, checkpoint saved
    sys.exit(EXIT_PREEMPTED)


def _user_errors():
  from rlhf_jax.checkpoint import CheckpointError
  from rlhf_jax.config import ConfigError
  from rlhf_jax.data.sft import DataError
  from rlhf_jax.trainers.loop import TrainingError
  # ValueError: bad pretrained files / tokenizers / argument values, which raise it with
  # a message naming the file or key. RLHF_JAX_DEBUG=1 shows the traceback instead.
  return (ConfigError, DataError, CheckpointError, TrainingError, FileNotFoundError,
          FileExistsError, ValueError)


def import_command(argv):
  if len(argv) != 2 or any(a.startswith("-") for a in argv):
    _die("usage: rlhf-jax import SRC OUT_DIR")
  from rlhf_jax.models import import_checkpoint
  try:
    import_checkpoint(argv[0], argv[1])
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    _die(str(e), 1)
  print(f"imported {argv[0]} -> {argv[1]}")


def eval_rm_command(argv):
  import argparse
  p = argparse.ArgumentParser(prog="rlhf-jax eval-rm")
  p.add_argument("--checkpoint", required=True, help="reward-model run directory")
  p.add_argument("--data", required=True, help="preference pairs file")
  p.add_argument("--format", default="jsonl", choices=["jsonl", "hh_rlhf"])
  p.add_argument("--batch_size", type=int, default=32)
  args = p.parse_args(argv)
  from rlhf_jax.trainers.reward_model import evaluate_reward_model
  try:
    r = evaluate_reward_model(args.checkpoint, args.data, args.format, args.batch_size)
  except _user_errors() as e:
    if os.environ.get("RLHF_JAX_DEBUG"):
      raise
    _die(str(e), 1)
  print(f"accuracy={r['accuracy']:.4f} pairs={r['pairs']} mean_margin={r['mean_margin']:.4f}")


def report_command(argv):
  from rlhf_jax import report
  sys.exit(report.main(argv))


def sweep_command(argv):
  from rlhf_jax import sweep
  sys.exit(sweep.main(argv))


def export_command(argv):
  from rlhf_jax import export
  sys.exit(export.main(argv))


def label_command(argv):
  from rlhf_jax import ai_feedback
  sys.exit(ai_feedback.label_main(argv))


def constitution_command(argv):
  from rlhf_jax import ai_feedback_constitution
  sys.exit(ai_feedback_constitution.constitution_main(argv))


COMMANDS = {"train": train_command, "import": import_command, "eval-rm": eval_rm_command,
            "sweep": sweep_command, "report": report_command,
            "export": export_command, "label": label_command,
            "constitution": constitution_command}


def cli(argv=None):
  if argv is None and len(sys.argv) > 1 and sys.argv[1] not in ("-h", "--help", "help"):
    from rlhf_jax import allocator
    allocator.reexec_with_tuned_malloc()  # glibc malloc tuned for XLA:CPU (allocator.py)
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(USAGE)
    return
  command = COMMANDS.get(argv[0])
  if command is None:
    _die(f"unknown command {argv[0]!r}; expected one of {sorted(COMMANDS)} "
         f"(`rlhf-jax --help` describes them)")
  if argv[0] != "train" or threading.current_thread() is not threading.main_thread():
    return command(argv[1:])
  # `train`: a SIGTERM before the training loop takes over (imports, data, compilation) or
  # after it leaves nothing unsaved: exit at once with the preemption code. (The loop turns
  # SIGTERM into "checkpoint, then stop". Python runs handlers between bytecodes, so a
  # long native call such as an XLA compilation delays it.)
  previous = signal.signal(signal.SIGTERM, _preempted_outside_the_loop)
  try:
    command(argv[1:])
  finally:
    signal.signal(signal.SIGTERM, previous)


def _preempted_outside_the_loop(signum, frame):
  print(f"preempted (SIGTERM) outside the training loop: exiting with {EXIT_PREEMPTED}; "
        f"rerun the same command to resume from the last checkpoint", file=sys.stderr,
        flush=True)
  raise SystemExit(EXIT_PREEMPTED)


if __name__ == "__main__":
  cli()
