"""tokenizer.json (the `tokenizers` format) for a Llama SentencePiece BPE model, legacy behaviour.

transformers >= 5 loads a LLaVA-NeXT tokenizer only through `tokenizers` (no slow SentencePiece
path), so the export writes this file next to tokenizer.model. It reproduces LLaVA's legacy slow
tokenizer: a dummy-prefix "▁" on every text segment between special tokens, spaces as "▁", byte
fallback, one BOS.
"""

from __future__ import annotations

import sentencepiece as spm

SPACE = "\u2581"  # SentencePiece's visible space


def _bpe_vocab_and_merges(
    sp: spm.SentencePieceProcessor,
) -> tuple[dict[str, int], list[str]]:
    """Vocab {piece: id} and BPE merges ranked like SentencePiece's own merge order.

    SentencePiece BPE merges the adjacent pair whose merged piece has the highest score; a
    `tokenizers` BPE merges the pair of lowest rank. Ranking every (left, right) split of a normal
    piece by that piece's score (descending) makes the two agree.
    """
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    ranked: list[tuple[float, int, int, int, str, str]] = []
    for i in range(sp.get_piece_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i):
            continue
        piece = sp.id_to_piece(i)
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append(
                    (-sp.get_score(i), i, vocab[left], vocab[right], left, right)
                )
    ranked.sort()
    return vocab, [f"{left} {right}" for *_, left, right in ranked]


def _added_token(token_id: int, content: str) -> dict:
    return {
        "id": token_id,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
    }


def tokenizer_json(tokenizer_path: str, added: dict[int, str]) -> dict:
    """The tokenizer.json dict; `added` maps ids past the SentencePiece vocab to special tokens."""
    sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
    vocab, merges = _bpe_vocab_and_merges(sp)
    unk, bos, eos = sp.unk_id(), sp.bos_id(), sp.eos_id()
    specials = {
        unk: sp.id_to_piece(unk),
        bos: sp.id_to_piece(bos),
        eos: sp.id_to_piece(eos),
    }
    specials.update(added)
    bos_piece = specials[bos]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [_added_token(i, c) for i, c in sorted(specials.items())],
        # Applied to each segment between special tokens: the legacy dummy prefix everywhere.
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": SPACE},
                {"type": "Replace", "pattern": {"String": " "}, "content": SPACE},
            ],
        },
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": bos_piece, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
            ],
            "pair": [
                {"SpecialToken": {"id": bos_piece, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": bos_piece, "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {
                bos_piece: {"id": bos_piece, "ids": [bos], "tokens": [bos_piece]}
            },
        },
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": specials[unk],
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }
