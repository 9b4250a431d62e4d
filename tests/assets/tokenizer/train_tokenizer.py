"""Regenerates the tiny Llama-like SentencePiece model the tests ship (tokenizer.model, vocab 1000).

Run from anywhere: `python tests/assets/tokenizer/train_tokenizer.py [OUTPUT]`. Deterministic and
path-independent: the same corpus gives a byte-identical model (single thread, no shuffling or
sampling; the corpus is streamed from memory so no file path is recorded in the model).
"""

from __future__ import annotations

import io
import os
import sys

import sentencepiece as spm

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus.txt")
MODEL_PATH = os.path.join(HERE, "tokenizer.model")


def train_bytes(corpus: str = CORPUS) -> bytes:
    """The serialized model trained on `corpus` (one sentence per line)."""
    with open(corpus, encoding="utf-8") as f:
        lines = f.read().splitlines()
    model = io.BytesIO()
    # Options mirror Llama-2 / Vicuna's tokenizer.model trainer_spec where they matter for behaviour:
    # BPE, byte fallback, split digits, unk 0 / bos 1 / eos 2 with no pad piece, the dummy prefix,
    # whitespace kept verbatim and identity normalisation.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=1000,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        split_by_unicode_script=True,
        split_by_whitespace=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        normalization_rule_name="identity",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        unk_piece="<unk>",
        bos_piece="<s>",
        eos_piece="</s>",
        max_sentence_length=4192,
        shuffle_input_sentence=False,
        input_sentence_size=0,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def main(output: str = MODEL_PATH) -> None:
    with open(output, "wb") as f:
        f.write(train_bytes())
    print(output)


if __name__ == "__main__":
    main(*sys.argv[1:2])
