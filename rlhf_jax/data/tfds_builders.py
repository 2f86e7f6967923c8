"""TFDS builders for preference data: `hh_rlhf` and `jsonl_preferences` (the prompt data
sets `gsm8k` and `jsonl_prompts` share this machinery: `rlhf_jax.data.tfds_prompts`).

Both are `tfds.core.GeneratorBasedBuilder`s that write `array_record` files
(`file_format=tfds.core.FileFormat.ARRAY_RECORD`) and need no TensorFlow:
tensorflow-datasets 4.9 encodes examples with its own numpy/protobuf example
serializer, writes them with the `array_record` package, and reads them back
with `builder.as_data_source(split)` / `tfds.builder_from_directory(dir)`
(an `ArrayRecordDataSource`: random access, numpy values, strings as bytes).
Only `as_dataset` (tf.data) would need TensorFlow; nothing here calls it.

On disk: <data_dir>/<name>/<config>/1.0.0/ with dataset_info.json,
features.json, metadata.json (build statistics, see
`preferences.preference_stats`) and <name>-<split>.array_record-0000i-of-0000n.
Examples keep the order of the source rows (TFDS's shuffle-on-write is
disabled; grain shuffles at read time).

Features: see `rlhf_jax.data.preferences` (prompt is JSON-encoded messages).

Re-building into a data_dir that already holds the dataset reuses it (TFDS's
rule) -- after checking that it was built from the same source files (sha256
recorded in metadata.json); a different source raises DataError instead of
silently reading stale data.

TFDS's own build messages ("Downloading and preparing dataset Unknown size ...", "Using
custom data configuration", "Variant folder ... has no dataset_info.json") read like a
download on an offline machine; they are silenced (`_quiet_tfds`) and each build or reuse
prints one line of ours instead (`_summary`):
  dataset gsm8k: 7,473 train / 1,319 eval rows -> <data_dir>/gsm8k/<config>/1.0.0 (built)
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import os
import numpy as np
import tensorflow_datasets as tfds

tfds.disable_progress_bar()  # building is quick; the trainers show their own progress
from etils import epath

from rlhf_jax.data import hh_rlhf
from rlhf_jax.data.rows import file_digest, parse_preference_row
from rlhf_jax.data.sft import DataError, iter_jsonl

VERSION = "1.0.0"
ARRAY_RECORD = tfds.core.FileFormat.ARRAY_RECORD
MAX_ERROR_EXAMPLES = 10  # malformed-row messages kept in the statistics

HH_SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
HH_SPLITS = ("train", "test")
HH_URL = "https://raw.githubusercontent.com/anthropics/hh-rlhf/master/{subset}/{split}.jsonl.gz"


def preference_features() -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      "prompt": tfds.features.Text(
          doc='JSON list of {"role", "content"} chat messages: the prompt'),
      "chosen": tfds.features.Text(doc="preferred final assistant reply"),
      "rejected": tfds.features.Text(doc="dispreferred final assistant reply"),
      "margin": tfds.features.Scalar(np.float32, doc="preference margin (0 when absent)"),
      "source": tfds.features.Text(doc="file:line of the source row"),
  })


def _normalize_files(files) -> dict[str, list[str]] | None:
  """None | path | [paths] | {split: path | [paths]} -> {split: [paths]} (bare path: 'train')."""
  if files is None:
    return None
  if isinstance(files, (str, os.PathLike)):
    files = {"train": [files]}
  elif not isinstance(files, dict):
    files = {"train": list(files)}
  out = {}
  for split, paths in files.items():
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
      raise DataError(f"files[{split!r}]: no files given")
    for p in paths:
      if not os.path.isfile(p):
        raise DataError(f"data file not found: {p}")
    out[str(split)] = [os.fspath(p) for p in paths]
  if not out:
    raise DataError("files: no splits given")
  return out


class _PreferenceBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared features, info and row loop. Extra constructor arguments:

  files: {split: path | [paths]} (or one path: the 'train' split) to read;
  skip_malformed: skip bad rows and count them instead of raising DataError.
  """

  VERSION = tfds.core.Version(VERSION)
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  DESCRIPTION = ""
  HOMEPAGE = None
  CITATION = ""

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS's own code_path evaluates `importlib_resources`, which tfds 4.9.10
    # declares as a dependency only for Python < 3.9: without it, preparing a
    # builder defined in a package fails. Same answer, no such import.
    return epath.Path(inspect.getfile(cls))

  def __init__(self, *, files=None, skip_malformed: bool = False, **kwargs):
    self._files = _normalize_files(files)
    self._skip_malformed = bool(skip_malformed)
    kwargs.setdefault("file_format", ARRAY_RECORD)
    with _quiet_tfds():  # "Using custom data configuration", "Variant folder ... has no ..."
      super().__init__(**kwargs)

  # TFDS prints these two itself ("Downloading and preparing dataset Unknown size ...",
  # "... downloaded and prepared to ..."): `_prepare` prints our one line instead.
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=self.DESCRIPTION, features=preference_features(),
        homepage=self.HOMEPAGE, citation=self.CITATION, disable_shuffling=True,
        metadata=tfds.core.MetadataDict())

  def _split_stats(self, split: str, sources: list[dict]) -> dict:
    stats = self.info.metadata.setdefault("stats", {})
    stats[split] = {"examples": 0, "malformed_skipped": 0, "malformed_examples": [],
                    "sources": sources}
    return stats[split]

  def _parse(self, where: str, row: dict, stats: dict) -> dict:
    """The example dict of one row (prompt JSON-encoded), or raise DataError."""
    raise NotImplementedError

  def _generate_examples(self, split: str, sources: list[tuple[str, str]]):
    """sources: [(local path, display name for messages)]."""
    stats = self._split_stats(split, [{"path": name, "sha256": file_digest(path)}
                                      for path, name in sources])
    key = 0
    for path, name in sources:
      for where, row in iter_jsonl(path, display=name):
        try:
          if isinstance(row, DataError):
            raise row
          ex = self._parse(where, row, stats)
        except DataError as e:
          if not self._skip_malformed:
            raise DataError(f"{e} (set skip_malformed=True to skip and count such rows)") from None
          stats["malformed_skipped"] += 1
          if len(stats["malformed_examples"]) < MAX_ERROR_EXAMPLES:
            stats["malformed_examples"].append(str(e))
          continue
        ex["source"] = where
        stats["examples"] += 1
        yield key, ex
        key += 1
    if not stats["examples"]:
      raise DataError(f"split {split!r}: no usable examples in "
                      f"{[name for _, name in sources]}")


class JsonlPreferences(_PreferenceBuilder):
  """Generic preference JSONL: {"prompt": str | [messages], "chosen", "rejected", "margin"?}.

  Construct with `files={split: path(s)}` and a config naming the data set
  (`build_jsonl_preferences` does both).
  """

  DESCRIPTION = "Preference pairs from JSONL files (see rlhf_jax.data.preferences)."

  def _parse(self, where, row, stats):
    ex = parse_preference_row(where, row)
    ex["prompt"] = json.dumps(ex["prompt"], ensure_ascii=False)
    return ex

  def _split_generators(self, dl_manager):
    if not self._files:
      raise DataError("jsonl_preferences: no input files; construct the builder with "
                      "files={'train': 'path.jsonl', ...}")
    return {split: self._generate_examples(split, [(p, p) for p in paths])
            for split, paths in self._files.items()}


@dataclasses.dataclass(eq=False)
class HhRlhfConfig(tfds.core.BuilderConfig):
  """One HH-RLHF subset (`subset`: a folder of github.com/anthropics/hh-rlhf)."""

  subset: str = "harmless-base"

  def __post_init__(self):
    if self.subset not in HH_SUBSETS:
      raise ValueError(f"hh_rlhf subset {self.subset!r}: expected one of {HH_SUBSETS} "
                       f"(red-team-attempts has no preference pairs)")


class HhRlhf(_PreferenceBuilder):
  """Anthropic HH-RLHF preference pairs, split into a shared prompt and two replies.

  Source, first that applies: `files={split: path(s)}`; the manual dir
  (DownloadConfig(manual_dir=...)) holding the official names
  `<subset>/<split>.jsonl.gz` (or `.jsonl`, or `<split>.jsonl[.gz]` directly);
  else the official files are downloaded from GitHub. See
  `rlhf_jax.data.hh_rlhf` for the split rule and its exactness guarantee.
  """

  BUILDER_CONFIGS = [HhRlhfConfig(name=s.replace("-", "_"), subset=s) for s in HH_SUBSETS]
  DEFAULT_CONFIG_NAME = "harmless_base"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Optional: place the official files as <manual_dir>/<subset>/<split>.jsonl.gz "
      "(e.g. harmless-base/test.jsonl.gz from github.com/anthropics/hh-rlhf); without "
      "them the files are downloaded.")
  DESCRIPTION = ("Anthropic HH-RLHF (Bai et al. 2022) human preference pairs; prompt = the "
                 "shared dialogue as chat messages, chosen/rejected = the final replies.")
  HOMEPAGE = "https://github.com/anthropics/hh-rlhf"
  CITATION = """@article{bai2022training,
  title={Training a Helpful and Harmless Assistant with Reinforcement Learning from Human Feedback},
  author={Bai, Yuntao and others}, journal={arXiv preprint arXiv:2204.05862}, year={2022}}"""
  _HH_COUNTS = ("split_at_common_prefix", "reply_has_turns", "consecutive_same_role",
                "inexact", "empty_chosen", "empty_rejected", "identical")

  def _split_stats(self, split, sources):
    stats = super()._split_stats(split, sources)
    stats.update({k: 0 for k in self._HH_COUNTS})
    return stats

  def _parse(self, where, row, stats):
    for key in ("chosen", "rejected"):
      if not isinstance(row.get(key), str):
        raise DataError(f"{where}: {key!r} must be a string (expected {{'chosen': str, "
                        f"'rejected': str}}; keys present: {sorted(row)})")
    try:
      prompt, chosen, rejected, flags = hh_rlhf.split_pair(row["chosen"], row["rejected"])
    except hh_rlhf.HHFormatError as e:
      raise DataError(f"{where}: {e}") from None
    flags.update(empty_chosen=not chosen.strip(), empty_rejected=not rejected.strip(),
                 identical=row["chosen"] == row["rejected"])
    for k, v in flags.items():
      stats[k] += int(v)
    return {"prompt": json.dumps(prompt, ensure_ascii=False), "chosen": chosen,
            "rejected": rejected, "margin": 0.0}

  def _split_generators(self, dl_manager):
    subset = self.builder_config.subset
    if self._files:
      return {split: self._generate_examples(split, [(p, p) for p in paths])
              for split, paths in self._files.items()}
    manual = find_hh_manual_files(_manual_dir(dl_manager), subset)
    if manual:
      return {split: self._generate_examples(split, [(p, p)]) for split, p in manual.items()}
    urls = {split: HH_URL.format(subset=subset, split=split) for split in HH_SPLITS}
    paths = dl_manager.download(urls)
    return {split: self._generate_examples(split, [(os.fspath(paths[split]), urls[split])])
            for split in HH_SPLITS}


def _manual_dir(dl_manager) -> str | None:
  try:
    return os.fspath(dl_manager.manual_dir)
  except AssertionError:  # not given, missing or empty
    return None


def find_hh_manual_files(manual_dir: str | None, subset: str) -> dict[str, str]:
  """{split: path} of HH files in manual_dir: <subset>/<split>.jsonl[.gz], or <split>.jsonl[.gz]."""
  if not manual_dir:
    return {}
  found = {}
  for split in HH_SPLITS:
    for rel in (f"{subset}/{split}.jsonl.gz", f"{subset}/{split}.jsonl",
                f"{split}.jsonl.gz", f"{split}.jsonl"):
      p = os.path.join(manual_dir, rel)
      if os.path.isfile(p):
        found[split] = p
        break
  return found


# ----------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------

def _check_sources(builder, files: dict[str, list[str]] | None):
  """A prepared dataset must have been built from these files (same sha256)."""
  if not builder.is_prepared() or not files:
    return
  meta = builder.info.metadata
  stats = dict(meta.get("stats", {})) if meta is not None else {}
  for split, paths in files.items():
    built = stats.get(split, {}).get("sources")
    want = [file_digest(p) for p in paths]
    have = [s.get("sha256") for s in built] if built else None
    if have != want:
      what = (f"no split {split!r}" if have is None else
              f"split {split!r} built from other files ({[s.get('path') for s in built]})")
      raise DataError(f"{builder.data_dir} already holds {builder.info.full_name} with {what}; "
                      f"asked for {paths}. Use another data_dir or config name, or delete "
                      f"that directory")


@contextlib.contextmanager
def _quiet_tfds():
  """TFDS's (absl) INFO / WARNING messages off for the block; errors still show."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def _summary(builder, built: bool) -> str:
  """`dataset gsm8k: 7,473 train / 1,319 eval rows -> DIR (built|cached)`."""
  splits = " / ".join(f"{info.num_examples:,} {name}" for name, info in builder.info.splits.items())
  return (f"dataset {builder.name}: {splits} rows -> {builder.data_dir} "
          f"({'built' if built else 'cached'})")


def _prepare(builder, files, download_config=None):
  from rlhf_jax import parallel
  with parallel.primary_first(f"tfds:{builder.info.full_name}"), _quiet_tfds():
    if not parallel.is_primary() and builder.is_prepared():  # multi-host: 0 builds it
      builder.info.read_from_directory(builder.data_dir)  # built meanwhile by process 0
    _check_sources(builder, files)
    built = not builder.is_prepared()
    builder.download_and_prepare(download_config=download_config, file_format=ARRAY_RECORD)
  if parallel.is_primary():
    print(_summary(builder, built), flush=True)
  return builder


def build_jsonl_preferences(files, data_dir: str, name: str = "default",
                            skip_malformed: bool = False) -> JsonlPreferences:
  """Build (or reuse) <data_dir>/jsonl_preferences/<name>/1.0.0 from JSONL files.

  files: {split: path | [paths]} or one path (the 'train' split); .jsonl or
  .jsonl.gz. Returns the prepared builder: `load_preferences(builder, split)`
  reads it, `preference_stats(builder)` gives the malformed-row counts.
  """
  files = _normalize_files(files)
  config = tfds.core.BuilderConfig(name=name, description=f"JSONL preferences {name!r}")
  b = JsonlPreferences(data_dir=data_dir, config=config, files=files,
                       skip_malformed=skip_malformed)
  return _prepare(b, files)


def build_hh_rlhf(data_dir: str, subset: str = "harmless-base", *, files=None,
                  manual_dir: str | None = None, config_name: str | None = None,
                  skip_malformed: bool = False) -> HhRlhf:
  """Build (or reuse) <data_dir>/hh_rlhf/<config>/1.0.0; returns the prepared builder.

  files: {split: path(s)} of HH-format jsonl / jsonl.gz files (e.g.
  {"test": ".../hh_rlhf_harmless_base_test.jsonl.gz"}); else manual_dir with
  the official layout; else download (needs network). config_name defaults to
  the subset ("harmless_base"); give another to keep differently-sourced
  builds of one subset apart.
  """
  if subset not in HH_SUBSETS:
    raise ValueError(f"hh_rlhf subset {subset!r}: expected one of {HH_SUBSETS}")
  files = _normalize_files(files)
  if manual_dir is not None and not os.path.isdir(manual_dir):
    raise DataError(f"hh_rlhf manual_dir not found: {manual_dir}")
  if files is None and manual_dir is not None:
    files = {s: [p] for s, p in find_hh_manual_files(manual_dir, subset).items()}
    if not files:
      raise DataError(f"{manual_dir}: no HH-RLHF files for subset {subset!r}; expected "
                      f"{subset}/train.jsonl.gz and/or {subset}/test.jsonl.gz")
  default = subset.replace("-", "_")
  config = default if config_name in (None, default) else HhRlhfConfig(
      name=config_name, subset=subset)
  b = HhRlhf(data_dir=data_dir, config=config, files=files, skip_malformed=skip_malformed)
  return _prepare(b, files)
