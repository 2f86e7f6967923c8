"""Tokenizers: SentencePiece training, HF tokenizer.json dirs, chat templates."""

import json
import os
from pathlib import Path

import pytest

from rlhf_jax.chat_format import chatml_default_system, detect_chat_style, render_chat
from rlhf_jax.tokenizer import load_tokenizer, train_sentencepiece
from rlhf_jax.tokenizer_base import Tokenizer

from conftest import shared_data_file

WORDS = ("the a of to and in that was her it his she he you not be with had as for but at "
         "on my is have by which all so this they were been would could there mr mrs miss "
         "elizabeth darcy emma anne sister house letter moment time").split()


def generated_text(n_lines=400, seed=0):
  import random
  rng = random.Random(seed)
  lines = []
  for _ in range(n_lines):
    words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
    words[0] = words[0].capitalize()
    lines.append(" ".join(words) + rng.choice([".", "!", "?", ", said she."]))
  return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A few KB of generated text (always available)."""
  path = tmp_path_factory.mktemp("corpus") / "gen.txt"
  path.write_text(generated_text())
  return path


@pytest.fixture(scope="module")
def austen(tmp_path_factory):
  """~200 KB of real text from ../shared/data/austen.txt (RLHF_JAX_DATA overrides the dir)."""
  src = shared_data_file("austen.txt")
  path = tmp_path_factory.mktemp("austen") / "austen200k.txt"
  with open(src, encoding="utf-8") as f:
    path.write_text(f.read(200_000))
  return path


@pytest.fixture(scope="module")
def sp_tok(corpus, tmp_path_factory):
  return train_sentencepiece(corpus, tmp_path_factory.mktemp("sp") / "m", 120)


def test_special_ids_distinct(sp_tok):
  ids = (sp_tok.pad_id, sp_tok.unk_id, sp_tok.bos_id, sp_tok.eos_id)
  assert ids == (0, 1, 2, 3)
  assert [sp_tok.id_to_token(i) for i in ids] == ["<pad>", "<unk>", "<s>", "</s>"]
  assert sp_tok.vocab_size == 120
  assert sp_tok.chat_style == "plain" and sp_tok.add_bos


def test_sentencepiece_round_trip_keeps_whitespace_and_newlines(sp_tok, corpus):
  text = corpus.read_text()[:3000]
  ids = sp_tok.encode(text)
  assert len(ids) < len(text) / 2  # it merged something
  assert sp_tok.decode(ids) == text
  odd = "Her  sister was there.\n\nHe had a letter!\n"
  assert sp_tok.decode(sp_tok.encode(odd)) == odd


def test_encode_bos_eos_and_control_tokens_decode_to_nothing(sp_tok):
  ids = sp_tok.encode("the sister", add_bos=True, add_eos=True)
  assert ids[0] == sp_tok.bos_id and ids[-1] == sp_tok.eos_id
  assert sp_tok.decode(ids) == "the sister"
  assert sp_tok.decode([sp_tok.pad_id] + ids[1:-1]) == "the sister"


def test_sentencepiece_training_deterministic(corpus, tmp_path):
  a = train_sentencepiece(corpus, tmp_path / "a", 100, "unigram")
  b = train_sentencepiece(corpus, tmp_path / "b", 100, "unigram")
  assert [a.id_to_token(i) for i in range(100)] == [b.id_to_token(i) for i in range(100)]
  text = corpus.read_text()[:2000]
  assert a.encode(text) == b.encode(text)
  assert a.decode(a.encode(text)) == text


def test_char_model(corpus, tmp_path):
  tok = train_sentencepiece(corpus, tmp_path / "c", 200, "char")
  text = "Emma was there."
  assert tok.decode(tok.encode(text)) == text
  assert len(tok.encode(text)) == len(text)


def test_austen_bpe_round_trip_and_speed(austen, tmp_path):
  import time
  t0 = time.perf_counter()
  tok = train_sentencepiece(austen, tmp_path / "austen", 1000, "bpe")
  assert time.perf_counter() - t0 < 30
  text = austen.read_text()[50_000:60_000]
  ids = tok.encode(text)
  assert len(ids) < len(text) / 3
  assert tok.decode(ids) == text


def test_save_and_load_dir(sp_tok, tmp_path):
  sp_tok.save(tmp_path)
  tok = load_tokenizer(tmp_path)
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size, tok.add_bos) == (2, 3, 0, 120, True)
  text = "Mrs sister had a letter."
  assert tok.encode(text) == sp_tok.encode(text)
  assert tok.chat_style == "plain"


def test_training_errors(tmp_path, corpus):
  with pytest.raises(FileNotFoundError, match="missing.txt"):
    train_sentencepiece(tmp_path / "missing.txt", tmp_path / "m", 100)
  with pytest.raises(ValueError, match="model_type='wordpiece'"):
    train_sentencepiece(corpus, tmp_path / "m", 100, "wordpiece")
  with pytest.raises(ValueError, match="vocab_size=100000"):
    train_sentencepiece(corpus, tmp_path / "m", 100000)


def test_load_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="nothing.model"):
    load_tokenizer(tmp_path / "nothing.model")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
    load_tokenizer(tmp_path / "empty")
  (tmp_path / "bad.model").write_bytes(b"not a model")
  with pytest.raises(ValueError, match="bad.model: not a SentencePiece model"):
    load_tokenizer(tmp_path / "bad.model")


# ----------------------------------------------------------------------------
# Hugging Face tokenizer.json directories
# ----------------------------------------------------------------------------

def write_hf_tokenizer(path, template, eos="<|im_end|>", pad="<|im_end|>"):
  """A tiny byte-level BPE tokenizer.json with chatml special tokens."""
  from tokenizers import AddedToken, Tokenizer as HFTok, decoders, models, pre_tokenizers
  from tokenizers.pre_tokenizers import ByteLevel
  vocab = {t: i for i, t in enumerate(
      ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + sorted(set(ByteLevel.alphabet())))}
  tok = HFTok(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                          for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
  path.mkdir(parents=True, exist_ok=True)
  tok.save(str(path / "tokenizer.json"))
  (path / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": None, "eos_token": {"content": eos}, "pad_token": pad,
       "chat_template": template}))
  return path


SMOL_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != "
                 "'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named "
                 "SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + "
                 "message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_hf_dir_special_tokens_pad_and_chatml(tmp_path):
  tok = load_tokenizer(write_hf_tokenizer(tmp_path, SMOL_TEMPLATE))
  assert tok.eos_id == 2 and tok.bos_id is None
  assert tok.pad_id == 0  # declared pad == eos: "<|endoftext|>" stands in
  assert not tok.add_bos
  assert tok.chat_style == "chatml"
  assert tok.default_system == ("You are a helpful AI assistant named SmolLM, trained by "
                                "Hugging Face")
  text = "<|im_start|>user\nHé!<|im_end|>\n"
  ids = tok.encode(text)
  assert ids[0] == 1 and 2 in ids and len(ids) == 1 + len("user\nH".encode()) + 2 + 2 + 1
  assert tok.decode(ids) == text
  assert tok.decode(ids, skip_special_tokens=True) == "user\nHé!\n"
  with pytest.raises(ValueError, match="no bos token"):
    tok.encode("x", add_bos=True)


def test_hf_dir_bad_special_token_name(tmp_path):
  write_hf_tokenizer(tmp_path, None, eos="</s>")
  with pytest.raises(ValueError, match="eos_token '</s>' is not in tokenizer.json"):
    load_tokenizer(tmp_path)


# ----------------------------------------------------------------------------
# Chat templates
# ----------------------------------------------------------------------------

CONV = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is 2+2?"}]


def test_chatml_exact():
  assert render_chat(CONV, "chatml") == (
      "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
      "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
  assert render_chat(CONV[:1], "chatml", add_generation_prompt=False,
                     default_system="Be brief.") == (
      "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n")
  own = [{"role": "system", "content": "Mine."}] + CONV[:1]
  assert render_chat(own, "chatml", False, default_system="Be brief.") == (
      "<|im_start|>system\nMine.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n")


def test_llama3_exact():
  assert render_chat(CONV[:2], "llama3") == (
      "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
      "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
      "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_plain_exact(sp_tok):
  want = "User: Hi there\nAssistant: Hello!\nUser: What is 2+2?\nAssistant:"
  assert render_chat(CONV, "plain") == want
  assert sp_tok.apply_chat_template(CONV) == want
  assert sp_tok.apply_chat_template(CONV, style="chatml").startswith("<|im_start|>user\n")


def test_gemma_exact():
  assert render_chat(CONV, "gemma") == (
      "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
      "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n")
  system = [{"role": "system", "content": "Be brief."}] + CONV[:1]
  assert render_chat(system, "gemma", add_generation_prompt=False) == (
      "<start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n")
  assert detect_chat_style("{{ '<start_of_turn>' + role + '\n' }}") == "gemma"


@pytest.mark.parametrize("style", ["chatml", "llama3", "gemma", "plain"])
def test_generation_prompt_is_prefix_of_full_conversation(style):
  prompt = render_chat(CONV[:1], style, add_generation_prompt=True)
  full = render_chat(CONV[:2], style, add_generation_prompt=False)
  assert full.startswith(prompt) and len(full) > len(prompt)


def test_detection_and_default_system():
  qwen = ("{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}"
          "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud.<|im_end|>\\n' }}"
          "{%- endif %}")
  assert detect_chat_style(qwen) == "chatml"
  assert chatml_default_system(qwen) == "You are Qwen, created by Alibaba Cloud."
  code = "{{ '<|im_start|>system\\n' + m['content'] + '<|im_end|>' }}"
  assert chatml_default_system(code) is None
  assert detect_chat_style("{{ '<|start_header_id|>' + role }}") == "llama3"
  assert detect_chat_style("{{ messages }}") is None and detect_chat_style(None) is None
  with pytest.raises(ValueError, match="chat style 'alpaca'"):
    render_chat(CONV, "alpaca")
  with pytest.raises(ValueError, match=r"messages\[0\]"):
    render_chat([{"text": "hi"}], "plain")


def test_explicit_style_overrides_detection(tmp_path):
  tok = load_tokenizer(write_hf_tokenizer(tmp_path, SMOL_TEMPLATE), chat_style="plain")
  assert tok.chat_style == "plain"
  assert isinstance(tok, Tokenizer)
