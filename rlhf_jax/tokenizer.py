"""Tokenizers: train SentencePiece, load SentencePiece / Hugging Face / GGUF, chat format.

One `Tokenizer` class wraps either a `sentencepiece.SentencePieceProcessor`
(our own small models) or a `tokenizers.Tokenizer` (Hugging Face
tokenizer.json, or the BPE vocabulary of a GGUF file rebuilt with the
`tokenizers` library), behind the same small interface:

    tok.encode(text, add_bos=False) -> list[int]     special tokens in text
                                                      (e.g. <|im_start|>) map to their ids
                                                      (`tokenizers` backends; SentencePiece
                                                      never parses control tokens in text)
    tok.decode(ids) -> str
    tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size
    tok.apply_chat_template(messages, add_generation_prompt=True) -> str
    tok.save(out_dir)                                 tokenizer files load_tokenizer reads

`pad_id` is always distinct from `eos_id`, so "is this token eos?" never
confuses padding with end of sequence. Models that declare no pad token, or
pad == eos (SmolLM2's GGUF declares padding_token_id 2 == eos 2), get a
stand-in: a token named <pad>/<|pad|>/<|finetune_right_pad_id|>, else the unk
token, else <|endoftext|>, else the lowest id that is neither eos nor bos
(SmolLM2: 0, "<|endoftext|>"). Padded positions are always masked, so which
id stands in does not change any result.

Chat templates are explicit styles, not Jinja (`CHAT_STYLES`):

    chatml  <|im_start|>{role}\\n{content}<|im_end|>\\n ... <|im_start|>assistant\\n
            (SmolLM2, Qwen); a model's default system prompt, when its template
            adds one, is kept in `default_system` and prepended likewise
    llama3  <|begin_of_text|><|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>
            ... <|start_header_id|>assistant<|end_header_id|>\\n\\n
    plain   {Role}: {content}\\n ... Assistant:      (our SentencePiece models)

The style is detected from a model's template text (contains <|im_start|> ->
chatml, <|start_header_id|> -> llama3) or given explicitly; without either it
is "plain". For every style the prompt with add_generation_prompt=True is a
prefix of the conversation that includes the assistant's reply.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

from rlhf_jax import gguf_file

CHAT_STYLES = ("chatml", "llama3", "plain")
TOKENIZER_CONFIG = "tokenizer_config.json"
# Our SentencePiece models: special ids fixed and distinct.
SP_PAD_ID, SP_UNK_ID, SP_BOS_ID, SP_EOS_ID = 0, 1, 2, 3
_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")


class Tokenizer:
  """Text <-> token ids plus special ids and chat formatting.

  Construct with `load_tokenizer` or `train_sentencepiece`. Attributes:
  bos_id (None when the model has none), eos_id, pad_id (never == eos_id),
  unk_id (or None), vocab_size, chat_style, default_system (chatml only),
  chat_template (the model's original Jinja text, kept for reference), add_bos
  (whether the model expects bos in front of a sequence: the add_bos_token
  metadata; True for our SentencePiece models, False for SmolLM2 whose "bos"
  is <|im_start|>): tokenize with `encode(text, add_bos=tok.add_bos)`.
  """

  def __init__(self, backend, *, bos_id, eos_id, pad_id=None, unk_id=None, chat_style=None,
               default_system=None, chat_template=None, add_bos=None, source=""):
    import sentencepiece as spm
    self._sp = backend if isinstance(backend, spm.SentencePieceProcessor) else None
    self._hf = None if self._sp is not None else backend
    self.source = str(source)
    if eos_id is None:
      raise ValueError(f"{self.source}: tokenizer declares no eos token; expected one")
    self.bos_id, self.eos_id, self.unk_id = bos_id, eos_id, unk_id
    self.add_bos = bool(bos_id is not None if add_bos is None else add_bos)
    if self.add_bos and bos_id is None:
      raise ValueError(f"{self.source}: add_bos_token is set but the tokenizer has no bos token")
    self.pad_id = _choose_pad(pad_id, eos_id, bos_id, unk_id, self.token_to_id, self.vocab_size)
    self.chat_template = chat_template
    if chat_style is None:
      chat_style = detect_chat_style(chat_template) or "plain"
    if chat_style not in CHAT_STYLES:
      raise ValueError(f"chat_style={chat_style!r}: expected one of {list(CHAT_STYLES)}")
    self.chat_style = chat_style
    if default_system is None and chat_style == "chatml":
      default_system = chatml_default_system(chat_template)
    self.default_system = default_system

  def __repr__(self):
    kind = "sentencepiece" if self._sp is not None else "tokenizers"
    return (f"Tokenizer({kind}, vocab_size={self.vocab_size}, bos={self.bos_id}, "
            f"eos={self.eos_id}, pad={self.pad_id}, chat_style={self.chat_style!r}, "
            f"source={self.source!r})")

  @property
  def vocab_size(self) -> int:
    if self._sp is not None:
      return self._sp.get_piece_size()
    return self._hf.get_vocab_size(with_added_tokens=True)

  def token_to_id(self, token: str) -> int | None:
    if self._sp is not None:
      i = self._sp.piece_to_id(token)
      return i if self._sp.id_to_piece(i) == token else None
    return self._hf.token_to_id(token)

  def id_to_token(self, i: int) -> str:
    return self._sp.id_to_piece(int(i)) if self._sp is not None else self._hf.id_to_token(int(i))

  def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    """Token ids of `text`; no special tokens are added unless asked for."""
    if self._sp is not None:
      ids = self._sp.encode(text, out_type=int)
    else:
      ids = self._hf.encode(text, add_special_tokens=False).ids
    if add_bos:
      if self.bos_id is None:
        raise ValueError(f"{self.source}: add_bos=True but this tokenizer has no bos token")
      ids = [self.bos_id] + ids
    return ids + [self.eos_id] if add_eos else ids

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
    """Text of `ids`. SentencePiece control tokens (pad/bos/eos) always decode to ''."""
    ids = [int(i) for i in ids]
    if self._sp is not None:
      return self._sp.decode(ids)
    return self._hf.decode(ids, skip_special_tokens=skip_special_tokens)

  def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                          style: str | None = None) -> str:
    """The conversation as one string in `style` (default: this tokenizer's chat_style).

    messages: [{"role": "system"|"user"|"assistant", "content": str}, ...].
    Special tokens appear as text; `encode` maps them to their ids.
    """
    return render_chat(messages, style or self.chat_style, add_generation_prompt,
                       self.default_system)

  def save(self, out_dir) -> Path:
    """Write tokenizer files into `out_dir` (tokenizer.json or tokenizer.model + config)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Atomic writes (temporary file + rename): a run killed while (re)writing its
    # workdir's tokenizer must find the complete old or new file when it resumes.
    if self._sp is not None:
      _replace_with(out_dir / "tokenizer.model",
                    lambda tmp: tmp.write_bytes(self._sp.serialized_model_proto()))
    else:
      _replace_with(out_dir / "tokenizer.json", lambda tmp: self._hf.save(str(tmp)))
    name = lambda i: None if i is None else self.id_to_token(i)
    cfg = {"bos_token": name(self.bos_id), "eos_token": name(self.eos_id),
           "pad_token": name(self.pad_id), "unk_token": name(self.unk_id),
           "chat_template": self.chat_template, "chat_style": self.chat_style,
           "default_system": self.default_system, "add_bos_token": self.add_bos}
    _replace_with(out_dir / TOKENIZER_CONFIG,
                  lambda tmp: tmp.write_text(json.dumps(cfg, indent=2) + "\n"))
    return out_dir


def _replace_with(path: Path, write) -> None:
  """write(tmp_path) then rename tmp_path -> path (atomic on POSIX)."""
  tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
  write(tmp)
  os.replace(tmp, path)


def _choose_pad(pad, eos, bos, unk, token_to_id, vocab_size):
  """A pad id distinct from eos (see the module docstring for the order tried)."""
  if pad is not None and pad != eos:
    return pad
  cands = [token_to_id(n) for n in _PAD_NAMES] + [unk, token_to_id("<|endoftext|>")]
  for c in cands:
    if c is not None and c not in (eos, bos):
      return c
  return next(i for i in range(vocab_size) if i not in (eos, bos))


# ----------------------------------------------------------------------------
# Chat formatting
# ----------------------------------------------------------------------------

def detect_chat_style(template: str | None) -> str | None:
  """'chatml' / 'llama3' from a model's Jinja chat template text, else None."""
  if not template:
    return None
  if "<|im_start|>" in template:
    return "chatml"
  if "<|start_header_id|>" in template:
    return "llama3"
  return None


def chatml_default_system(template: str | None) -> str | None:
  """The system prompt a chatml Jinja template inserts when none is given, if any.

  Finds a literal '<|im_start|>system\\n...<|im_end|>' string in the template
  (SmolLM2: "You are a helpful AI assistant named SmolLM, trained by Hugging
  Face"; Qwen2.5: "You are Qwen, ...").
  """
  if not template:
    return None
  for m in re.finditer(r"<\|im_start\|>system(?:\n|\\n)(.*?)<\|im_end\|>", template, re.S):
    text = m.group(1)
    if not any(ch in text for ch in "'\"{}+"):  # a literal, not template code
      return text.replace("\\n", "\n")
  return None


def render_chat(messages: Sequence[dict], style: str, add_generation_prompt: bool = True,
                default_system: str | None = None) -> str:
  """Render messages in one of CHAT_STYLES (see the module docstring)."""
  if style not in CHAT_STYLES:
    raise ValueError(f"chat style {style!r}: expected one of {list(CHAT_STYLES)}")
  msgs = []
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
      raise ValueError(f"messages[{i}]={m!r}: expected a dict with 'role' and 'content'")
    msgs.append((str(m["role"]), str(m["content"])))
  if style == "chatml":
    if default_system and msgs and msgs[0][0] != "system":
      msgs.insert(0, ("system", default_system))
    out = "".join(f"<|im_start|>{r}\n{c}<|im_end|>\n" for r, c in msgs)
    return out + ("<|im_start|>assistant\n" if add_generation_prompt else "")
  if style == "llama3":
    out = "<|begin_of_text|>" + "".join(
        f"<|start_header_id|>{r}<|end_header_id|>\n\n{c.strip()}<|eot_id|>" for r, c in msgs)
    return out + ("<|start_header_id|>assistant<|end_header_id|>\n\n"
                  if add_generation_prompt else "")
  out = "".join(f"{r.capitalize()}: {c}\n" for r, c in msgs)
  return out + ("Assistant:" if add_generation_prompt else "")


# ----------------------------------------------------------------------------
# SentencePiece training
# ----------------------------------------------------------------------------

def train_sentencepiece(text_files: str | Path | Sequence[str | Path], model_prefix: str | Path,
                        vocab_size: int, model_type: str = "bpe", *,
                        character_coverage: float = 1.0, byte_fallback: bool = False,
                        user_defined_symbols: Sequence[str] = (),
                        input_sentence_size: int = 0, num_threads: int = 1,
                        chat_style: str = "plain") -> Tokenizer:
  """Train a SentencePiece model on text files; writes {model_prefix}.model/.vocab.

  Ids: pad 0 <pad>, unk 1 <unk>, bos 2 <s>, eos 3 </s>. Text is taken as is
  (identity normalisation, no dummy prefix, whitespace kept), so decode(encode(t))
  == t for text whose characters were seen in training, and "\\n" is a piece
  of its own (SentencePiece reads one sentence per line and would never see it).
  Characters not seen decode as " ⁇ " unless `byte_fallback` (needs
  vocab_size > 260). Single-threaded by default so the model is the same bit
  for bit on every run. model_type: 'bpe', 'unigram', 'char' or 'word'.
  """
  import sentencepiece as spm
  files = [text_files] if isinstance(text_files, (str, Path)) else list(text_files)
  if not files:
    raise ValueError("train_sentencepiece: no text files given")
  for f in files:
    if not Path(f).is_file():
      raise FileNotFoundError(f"{f}: training text file does not exist")
  if model_type not in ("bpe", "unigram", "char", "word"):
    raise ValueError(f"model_type={model_type!r}: expected 'bpe', 'unigram', 'char' or 'word'")
  model_prefix = Path(model_prefix)
  model_prefix.parent.mkdir(parents=True, exist_ok=True)
  symbols = ["\n"] + [s for s in user_defined_symbols if s != "\n"]
  try:
    spm.SentencePieceTrainer.train(
        input=[str(f) for f in files], model_prefix=str(model_prefix), vocab_size=vocab_size,
        model_type=model_type, character_coverage=character_coverage,
        byte_fallback=byte_fallback, user_defined_symbols=symbols,
        pad_id=SP_PAD_ID, unk_id=SP_UNK_ID, bos_id=SP_BOS_ID, eos_id=SP_EOS_ID,
        pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
        input_sentence_size=input_sentence_size, shuffle_input_sentence=False,
        hard_vocab_limit=model_type != "char", num_threads=num_threads, minloglevel=2)
  except RuntimeError as e:
    raise ValueError(f"train_sentencepiece({files}, vocab_size={vocab_size}, "
                     f"model_type={model_type!r}): {e}") from None
  return load_tokenizer(f"{model_prefix}.model", chat_style=chat_style)


# ----------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------

def load_tokenizer(path, chat_style: str | None = None) -> Tokenizer:
  """Tokenizer from a SentencePiece .model file, a directory or a .gguf file.

  A directory holds tokenizer.json (Hugging Face `tokenizers`) or
  tokenizer.model (SentencePiece), with special tokens and chat template from
  tokenizer_config.json / config.json / generation_config.json when present
  (directories written by `Tokenizer.save` and `import_checkpoint` qualify).
  A GGUF file must carry a gpt2-style BPE vocabulary (tokenizer.ggml.model
  'gpt2'). `chat_style` forces a chat style over the detected one.
  """
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"{path}: no such tokenizer file or directory; expected a "
                            f"SentencePiece .model file, a directory with tokenizer.json or "
                            f"tokenizer.model, or a .gguf file")
  if path.is_dir():
    return _load_dir(path, chat_style)
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic == b"GGUF":
    return _load_gguf(path, chat_style)
  if path.suffix == ".json":
    return _load_dir(path.parent, chat_style, tokenizer_json=path)
  return _load_sp(path, chat_style, {})


def _load_sp(path: Path, chat_style, cfg: dict) -> Tokenizer:
  import sentencepiece as spm
  sp = spm.SentencePieceProcessor()
  try:
    sp.load(str(path))
  except (OSError, RuntimeError) as e:
    raise ValueError(f"{path}: not a SentencePiece model file: {e}") from None
  opt = lambda i: None if i < 0 else i
  ids = {"bos": opt(sp.bos_id()), "eos": opt(sp.eos_id()), "pad": opt(sp.pad_id()),
         "unk": opt(sp.unk_id())}
  for k in ids:  # tokenizer_config.json names win over the proto's ids
    name = _token_name(cfg.get(f"{k}_token"))
    if name is not None and sp.id_to_piece(sp.piece_to_id(name)) == name:
      ids[k] = sp.piece_to_id(name)
  return Tokenizer(sp, bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["pad"],
                   unk_id=ids["unk"], chat_style=chat_style or cfg.get("chat_style"),
                   default_system=cfg.get("default_system"), add_bos=cfg.get("add_bos_token"),
                   chat_template=_template_text(cfg.get("chat_template")), source=path)


def _read_json(path: Path) -> dict:
  if not path.is_file():
    return {}
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON: {e}") from None


def _token_name(tok) -> str | None:
  """Special-token entry of tokenizer_config.json: a string or {"content": ...}."""
  if isinstance(tok, dict):
    return tok.get("content")
  return tok if isinstance(tok, str) else None


def _template_text(t) -> str | None:
  """chat_template may be a string or a list of {"name", "template"}."""
  if isinstance(t, list):
    named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
    return named.get("default") or next(iter(named.values()), None)
  return t if isinstance(t, str) else None


def _first_id(x) -> int | None:
  if isinstance(x, list):
    return int(x[0]) if x else None
  return None if x is None else int(x)


def _load_dir(path: Path, chat_style, tokenizer_json: Path | None = None) -> Tokenizer:
  cfg = _read_json(path / TOKENIZER_CONFIG)
  model_cfg = _read_json(path / "config.json")
  gen_cfg = _read_json(path / "generation_config.json")
  tj = tokenizer_json or path / "tokenizer.json"
  if not tj.is_file():
    if (path / "tokenizer.model").is_file():
      return _load_sp(path / "tokenizer.model", chat_style, cfg)
    raise FileNotFoundError(f"{path}: no tokenizer.json or tokenizer.model in this directory")
  import tokenizers
  try:
    tok = tokenizers.Tokenizer.from_file(str(tj))
  except Exception as e:  # tokenizers raises its own Exception type
    raise ValueError(f"{tj}: cannot read tokenizer.json: {e}") from None
  ids = {}
  for k in ("bos", "eos", "pad", "unk"):
    name = _token_name(cfg.get(f"{k}_token"))
    i = tok.token_to_id(name) if name is not None else None
    if name is not None and i is None:
      raise ValueError(f"{path / TOKENIZER_CONFIG}: {k}_token {name!r} is not in {tj.name}")
    if i is None:
      i = _first_id(model_cfg.get(f"{k}_token_id", gen_cfg.get(f"{k}_token_id")))
    ids[k] = i
  add_bos = cfg.get("add_bos_token", False)  # Llama-3 templates write <|begin_of_text|>
  return Tokenizer(tok, bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["pad"],
                   unk_id=ids["unk"], chat_style=chat_style or cfg.get("chat_style"),
                   default_system=cfg.get("default_system"),
                   add_bos=add_bos and ids["bos"] is not None,
                   chat_template=_template_text(cfg.get("chat_template")), source=path)


# Pre-tokenizer split patterns of llama.cpp's BPE pre-types.
_GPT2_PRE = ("gpt2", "default", "olmo", "jina-es", "jina-de", "jina-v2-es", "jina-v2-de")
_STARCODER_PRE = ("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva")
_LLAMA3_PRE = ("llama-bpe", "llama3", "smaug-bpe", "dbrx")
_LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
              r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
             r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _gguf_pre_tokenizer(pre: str, where: str):
  from tokenizers import Regex, pre_tokenizers as pt
  if pre in _GPT2_PRE:
    return pt.ByteLevel(add_prefix_space=False, use_regex=True), False
  if pre in _STARCODER_PRE:  # each digit alone, then the GPT-2 split
    return pt.Sequence([pt.Digits(individual_digits=True),
                        pt.ByteLevel(add_prefix_space=False, use_regex=True)]), False
  if pre in _LLAMA3_PRE or pre == "qwen2":
    rx = _QWEN2_RE if pre == "qwen2" else _LLAMA3_RE
    return pt.Sequence([pt.Split(Regex(rx), behavior="isolated", invert=False),
                        pt.ByteLevel(add_prefix_space=False, use_regex=False)]), pre != "qwen2"
  raise ValueError(f"{where}: tokenizer.ggml.pre={pre!r} is not supported; expected one of "
                   f"{sorted(_GPT2_PRE + _STARCODER_PRE + _LLAMA3_PRE + ('qwen2',))}")


def _load_gguf(path: Path, chat_style) -> Tokenizer:
  """Rebuild a GGUF's gpt2-style byte-level BPE vocabulary as a `tokenizers.Tokenizer`."""
  import tokenizers
  from tokenizers import AddedToken, decoders, models
  where = str(path)
  reader = gguf_file.reader(path)
  field = lambda key, default=...: gguf_file.field(reader, key, default, where)
  kind = field("tokenizer.ggml.model", None)
  if kind is None:
    raise ValueError(f"{where}: GGUF file carries no tokenizer (no tokenizer.ggml.model)")
  if kind != "gpt2":
    raise ValueError(f"{where}: tokenizer.ggml.model={kind!r} is not supported; expected 'gpt2' "
                     f"(byte-level BPE)")
  tokens = field("tokenizer.ggml.tokens")
  merges = field("tokenizer.ggml.merges")
  types = field("tokenizer.ggml.token_type", [1] * len(tokens))
  pre_tok, ignore_merges = _gguf_pre_tokenizer(field("tokenizer.ggml.pre", "default"), where)
  vocab = {t: i for i, t in enumerate(tokens)}
  pairs = []
  for m in merges:
    a, sep, b = m.partition(" ")
    if not sep:
      raise ValueError(f"{where}: tokenizer.ggml.merges entry {m!r}: expected 'left right'")
    pairs.append((a, b))
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False,
                                        ignore_merges=ignore_merges))
  tok.pre_tokenizer = pre_tok
  tok.decoder = decoders.ByteLevel()
  # llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                          for t, ty in zip(tokens, types) if ty == 3])
  tok.add_tokens([AddedToken(t, special=False, normalized=False)
                  for t, ty in zip(tokens, types) if ty == 4])
  opt = lambda key: None if (v := field(key, None)) is None else int(v)
  return Tokenizer(tok, bos_id=opt("tokenizer.ggml.bos_token_id"),
                   eos_id=opt("tokenizer.ggml.eos_token_id"),
                   pad_id=opt("tokenizer.ggml.padding_token_id"),
                   unk_id=opt("tokenizer.ggml.unknown_token_id"), chat_style=chat_style,
                   chat_template=field("tokenizer.chat_template", None),
                   add_bos=bool(field("tokenizer.ggml.add_bos_token", False)), source=path)
