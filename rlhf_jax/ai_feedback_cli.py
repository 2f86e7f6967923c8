"""Command-line plumbing shared by `rlhf-jax label` and `rlhf-jax constitution`: the judge
flags, the judge they build, user errors as one `error: ...` line, atomic stats.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def _judge_args(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group("judge")
  g.add_argument("--rubric", default="", help="LM judge: a text file (or a constitution "
                 ".json/.jsonl) with the judging instructions; default: a built-in rubric")
  g.add_argument("--verdicts", default="A,B", help="LM judge: the two answer labels whose "
                 "first tokens' log-probs give the verdict")
  g.add_argument("--judge_batch_size", type=int, default=16, help="rows per judge forward pass")
  g.add_argument("--judge_max_len", type=int, default=1024,
                 help="LM judge: longest judge prompt in tokens (longer: left-truncated)")
  g.add_argument("--judge_dtype", default="float32", choices=["float32", "bfloat16"])
  g.add_argument("--tie_margin", type=float, default=0.0,
                 help="|preference| below this is a tie (no pair)")
  g.add_argument("--margin_scale", type=float, default=1.0,
                 help="pairs.jsonl margin = this x the judge's preference strength")


def _make_judge(args):
  from rlhf_jax import judges
  verdicts = tuple(v.strip() for v in args.verdicts.split(","))
  return judges.make_judge(args.judge, rubric_path=args.rubric or None, verdicts=verdicts,
                           batch_size=args.judge_batch_size, max_len=args.judge_max_len,
                           dtype=args.judge_dtype)


def _user_errors():
  from rlhf_jax.checkpoint import CheckpointError
  from rlhf_jax.data.sft import DataError
  return (DataError, CheckpointError, FileNotFoundError, FileExistsError, ValueError)


def _run(main, argv) -> int:
  """main(argv) with user errors as one `error: ...` line (RLHF_JAX_DEBUG=1: traceback)."""
  try:
    return main(argv)
  except SystemExit as e:  # argparse: usage / error line already printed
    return int(e.code or 0)
  except _user_errors() as e:
    if os.environ.get("RLHF_JAX_DEBUG"):
      raise
    print(f"error: {e}", file=sys.stderr)
    return 1


def _write_json(path: str, obj) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
    f.write("\n")
  os.replace(tmp, path)
