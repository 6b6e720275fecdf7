"""A small byte-level BPE for end-to-end tests, trained once on the chitchat conversations.

Why: at the tests' hidden size of 64 the bundled 50k-token GPT-2 vocabulary makes the embedding
and lm_head most of every step's work (and most of the optimizer state). A 1k vocabulary keeps
the runs' meaning (real conversations, the Granite chat template and role tokens, byte-level so
any text encodes) at a fraction of the cost. Tests that are about the bundled tokenizer or the
README's main job keep `gpt2-bundled`.

`TINY_TOKENIZER` is a directory with tokenizer.json + tokenizer_config.json, built on first
import into the system temp dir (keyed by this file's recipe and the tokenizers version) and
reused by every later test process; the build is atomic (written aside, then renamed).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import tokenizers

VOCAB_SIZE = 1024
_RECIPE = f"v2 vocab={VOCAB_SIZE} chitchat byte-level tokenizers={tokenizers.__version__}"


def _texts():
    from granite_train.data.demo import _chitchat_rows

    for row in _chitchat_rows():
        for message in row["messages"]:
            yield message["content"]


def _build(out: Path) -> None:
    from granite_train.data.tokenizer import EOS_TOKEN, GRANITE_SPECIAL_TOKENS, Tokenizer

    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(_texts(), vocab_size=VOCAB_SIZE, min_frequency=2,
                            special_tokens=list(GRANITE_SPECIAL_TOKENS), show_progress=False)
    backend = tokenizers.Tokenizer.from_str(bpe.to_str())
    Tokenizer(backend, EOS_TOKEN, name="tiny-test-bpe").save(out)
    # Like the bundled tokenizer, no chat template of its own: runs use the built-in Granite one.
    config = json.loads((out / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def tiny_tokenizer_dir() -> Path:
    key = hashlib.sha256(_RECIPE.encode()).hexdigest()[:12]
    path = Path(tempfile.gettempdir()) / f"granite_train_test_tokenizer_{key}"
    if not (path / "tokenizer.json").is_file():
        aside = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
        _build(aside)
        try:
            os.rename(aside, path)
        except OSError:  # another process built it first: use theirs
            if not (path / "tokenizer.json").is_file():
                raise
    return path


TINY_TOKENIZER = str(tiny_tokenizer_dir())
