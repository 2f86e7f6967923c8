"""TFDS builders for prompt data sets (online RL): `gsm8k` and `jsonl_prompts`.

The machinery of `rlhf_jax.data.tfds_builders` (array_record files, no TensorFlow, files /
skip_malformed / statistics, the sha256 source check on reuse) with the prompt features
of `rlhf_jax.data.prompts`.
"""
from __future__ import annotations

import json
import os

import tensorflow_datasets as tfds

from rlhf_jax.data.rows import parse_gsm8k_row, parse_prompt_row
from rlhf_jax.data.sft import DataError
from rlhf_jax.data.tfds_builders import _manual_dir, _normalize_files, _prepare, _PreferenceBuilder

GSM8K_SPLITS = ("train", "test")
GSM8K_URL = ("https://raw.githubusercontent.com/openai/grade-school-math/master/"
             "grade_school_math/data/{split}.jsonl")


def prompt_features() -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      "prompt": tfds.features.Text(
          doc='JSON list of {"role", "content"} chat messages: the prompt'),
      "answer": tfds.features.Text(doc='reference final answer ("" when none)'),
      "solution": tfds.features.Text(doc='full reference solution ("" when none)'),
      "source": tfds.features.Text(doc="file:line of the source row"),
  })


class _PromptBuilder(_PreferenceBuilder, skip_registration=True):
  """The preference builders' machinery (files, skip_malformed, stats, sha256
  check) with the prompt features of `rlhf_jax.data.prompts`."""

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=self.DESCRIPTION, features=prompt_features(),
        homepage=self.HOMEPAGE, citation=self.CITATION, disable_shuffling=True,
        metadata=tfds.core.MetadataDict())

  def _split_stats(self, split, sources):
    stats = super()._split_stats(split, sources)
    stats["with_answer"] = 0
    return stats

  def _row(self, where: str, row: dict, stats: dict) -> dict:
    """{"prompt": [messages], "answer", "solution"} of one row, or DataError."""
    raise NotImplementedError

  def _parse(self, where, row, stats):
    ex = self._row(where, row, stats)
    stats["with_answer"] += int(bool(ex["answer"]))
    ex["prompt"] = json.dumps(ex["prompt"], ensure_ascii=False)
    return ex

  def _split_generators(self, dl_manager):
    if not self._files:
      raise DataError(f"{self.name}: no input files; construct the builder with "
                      f"files={{'train': 'path.jsonl', ...}}")
    return {split: self._generate_examples(split, [(p, p) for p in paths])
            for split, paths in self._files.items()}


class JsonlPrompts(_PromptBuilder):
  """Generic prompt JSONL: {"prompt": str | [messages], "answer"?, "solution"?}.

  Construct with `files={split: path(s)}` and a config naming the data set
  (`build_jsonl_prompts` does both).
  """

  DESCRIPTION = "Prompts with optional reference answers from JSONL (see rlhf_jax.data.prompts)."

  def _row(self, where, row, stats):
    return parse_prompt_row(where, row)


class Gsm8k(_PromptBuilder, skip_registration=True):
  """OpenAI GSM8K grade-school math: question -> prompt, '#### n' -> answer, the
  reasoning without calculator annotations -> solution (`rlhf_jax.data.prompts`).

  Not registered with TFDS (its catalog has a `gsm8k` of its own, with other
  features); read back with `load_prompts` / `tfds.builder_from_directory`.
  Source, first that applies: `files={split: path(s)}`; the manual dir holding
  `train.jsonl` / `test.jsonl` (or `gsm8k_train.jsonl` / `gsm8k_test.jsonl`);
  else the official files are downloaded from GitHub.
  """

  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="main", description="GSM8K main format")]
  DEFAULT_CONFIG_NAME = "main"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Optional: place the official train.jsonl / test.jsonl (grade_school_math/data of "
      "github.com/openai/grade-school-math) in the manual dir; without them the files are "
      "downloaded.")
  DESCRIPTION = ("GSM8K (Cobbe et al. 2021): 8.5K grade-school math word problems with "
                 "reasoning and a final numeric answer.")
  HOMEPAGE = "https://github.com/openai/grade-school-math"
  CITATION = """@article{cobbe2021gsm8k,
  title={Training Verifiers to Solve Math Word Problems},
  author={Cobbe, Karl and others}, journal={arXiv preprint arXiv:2110.14168}, year={2021}}"""

  def _split_stats(self, split, sources):
    stats = super()._split_stats(split, sources)
    stats["annotations_stripped"] = 0
    return stats

  def _row(self, where, row, stats):
    ex = parse_gsm8k_row(where, row)
    stats["annotations_stripped"] += row["answer"].count("<<")
    return ex

  def _split_generators(self, dl_manager):
    if self._files:
      return super()._split_generators(dl_manager)
    manual = find_gsm8k_manual_files(_manual_dir(dl_manager))
    if manual:
      return {split: self._generate_examples(split, [(p, p)]) for split, p in manual.items()}
    urls = {split: GSM8K_URL.format(split=split) for split in GSM8K_SPLITS}
    paths = dl_manager.download(urls)
    return {split: self._generate_examples(split, [(os.fspath(paths[split]), urls[split])])
            for split in GSM8K_SPLITS}


def find_gsm8k_manual_files(manual_dir: str | None) -> dict[str, str]:
  """{split: path} of GSM8K files in manual_dir: <split>.jsonl or gsm8k_<split>.jsonl."""
  if not manual_dir:
    return {}
  found = {}
  for split in GSM8K_SPLITS:
    for rel in (f"{split}.jsonl", f"gsm8k_{split}.jsonl"):
      p = os.path.join(manual_dir, rel)
      if os.path.isfile(p):
        found[split] = p
        break
  return found


def build_jsonl_prompts(files, data_dir: str, name: str = "default",
                        skip_malformed: bool = False) -> JsonlPrompts:
  """Build (or reuse) <data_dir>/jsonl_prompts/<name>/1.0.0 from JSONL files.

  files: {split: path | [paths]} or one path (the 'train' split); .jsonl or
  .jsonl.gz. Returns the prepared builder: `prompts.load_prompts(builder,
  split)` reads it, `prompts.prompt_stats(builder)` gives the counts.
  """
  files = _normalize_files(files)
  config = tfds.core.BuilderConfig(name=name, description=f"JSONL prompts {name!r}")
  b = JsonlPrompts(data_dir=data_dir, config=config, files=files, skip_malformed=skip_malformed)
  return _prepare(b, files)


def build_gsm8k(data_dir: str, *, files=None, manual_dir: str | None = None,
                config_name: str | None = None, skip_malformed: bool = False) -> Gsm8k:
  """Build (or reuse) <data_dir>/gsm8k/<config>/1.0.0; returns the prepared builder.

  files: {split: path(s)} of official-format JSONL files (e.g. {"train":
  ".../gsm8k_train.jsonl", "test": ".../gsm8k_test.jsonl"}); else manual_dir
  with train.jsonl / test.jsonl; else download (needs network). config_name
  defaults to "main"; give another to keep differently-sourced builds apart.
  """
  files = _normalize_files(files)
  if manual_dir is not None and not os.path.isdir(manual_dir):
    raise DataError(f"gsm8k manual_dir not found: {manual_dir}")
  if files is None and manual_dir is not None:
    files = {s: [p] for s, p in find_gsm8k_manual_files(manual_dir).items()}
    if not files:
      raise DataError(f"{manual_dir}: no GSM8K files; expected train.jsonl and/or test.jsonl "
                      f"(or gsm8k_train.jsonl / gsm8k_test.jsonl)")
  config = "main" if config_name in (None, "main") else tfds.core.BuilderConfig(
      name=config_name, description=f"GSM8K from {files}")
  b = Gsm8k(data_dir=data_dir, config=config, files=files, skip_malformed=skip_malformed)
  return _prepare(b, files)
