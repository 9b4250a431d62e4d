"""SentencePiece tokenizer with the original slow ("legacy") Llama behaviour used by the LLaVA recipe.

`</s>` written in a prompt becomes the eos id; every other chunk is encoded with the dummy prefix.
"""

from __future__ import annotations

import os
from typing import Iterable

import sentencepiece as spm

from titan_llava.constants import IMAGE_TOKEN_INDEX

# The only special token the prompt templates write as text (vicuna_v1's round separator).
EOS_TEXT = "</s>"
# How decode() renders an image placeholder, so decoded prompts read like the templates' text.
IMAGE_TEXT = "<image>"


class Tokenizer:
    """A Llama/Vicuna `tokenizer.model` used like transformers' slow LlamaTokenizer with legacy=True.

    `pad_id` is the unk id: the vicuna_v1 reference sets `pad_token = unk_token`, and padding is never
    learned. The slow tokenizer also splits the literal texts `<s>` and `<unk>`; we deliberately map
    only `</s>` (the one the templates write) and encode the others as ordinary text.
    """

    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            raise ValueError(f"model.tokenizer_path: SentencePiece model not found: {model_path!r}")
        self.model_path = model_path
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(model_path)
        except (RuntimeError, OSError) as err:
            raise ValueError(
                f"model.tokenizer_path: {model_path!r} is not a SentencePiece model ({err})"
            ) from err
        self.vocab_size: int = self._sp.get_piece_size()
        self.bos_id: int = self._sp.bos_id()
        self.eos_id: int = self._sp.eos_id()
        self.unk_id: int = self._sp.unk_id()
        self.pad_id: int = self.unk_id
        for name in ("bos_id", "eos_id", "unk_id"):
            if getattr(self, name) < 0:
                raise ValueError(
                    f"model.tokenizer_path: {model_path!r} defines no {name[:-3]} token; "
                    "a Llama-style model (unk, <s>, </s>) is required"
                )

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`: each non-empty chunk between literal `</s>` gets its own dummy prefix."""
        ids: list[int] = [self.bos_id] if bos else []
        chunks = text.split(EOS_TEXT)
        for i, chunk in enumerate(chunks):
            if i > 0:
                ids.append(self.eos_id)
            if chunk:
                ids.extend(self._sp.encode(chunk))
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; IMAGE_TOKEN_INDEX is rendered as `<image>` (debugging aid, not an inverse)."""
        pieces: list[str] = []
        run: list[int] = []
        for token in ids:
            token = int(token)
            if token == IMAGE_TOKEN_INDEX:
                pieces.append(self._sp.decode(run))
                pieces.append(IMAGE_TEXT)
                run = []
            elif 0 <= token < self.vocab_size:
                run.append(token)
            else:
                raise ValueError(f"token id {token} is outside the vocabulary (size {self.vocab_size})")
        pieces.append(self._sp.decode(run))
        return "".join(pieces)

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)
