"""LLaVA conversation templates ("plain", "vicuna_v1"): prompt text -> input_ids and labels.

Reproduces the reference's preprocess_multimodal / preprocess_plain / preprocess_v1, including its
per-round label arithmetic and its "tokenization mismatch" rule (whole sample masked).
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Sequence

from titan_llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from titan_llava.data.errors import BadSampleError
from titan_llava.data.tokenizer import EOS_TEXT, Tokenizer

logger = logging.getLogger(__name__)

IMAGE_MARKER = "<image>"
HUMAN_ROLE = "human"
GPT_ROLE = "gpt"
TEMPLATES = ("plain", "vicuna_v1")

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
VICUNA_USER = "USER"
VICUNA_ASSISTANT = "ASSISTANT"
VICUNA_SEP = " "  # after the system prompt and after each user turn
VICUNA_SEP2 = EOS_TEXT  # after each assistant turn: the round separator
PLAIN_SEP = "\n"  # appended to the caption

Conversation = Sequence[dict[str, Any]]


def _bad(detail: str) -> BadSampleError:
    return BadSampleError("bad_conversation", detail)


def _validated_turns(conversations: Any) -> list[tuple[str, str]]:
    """(role, value) pairs, or BadSampleError for anything that is not a LLaVA conversation list."""
    if not isinstance(conversations, (list, tuple)) or not conversations:
        raise _bad(f"'conversations' must be a non-empty list, got {type(conversations).__name__}")
    turns = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise _bad(f"turn {i} is not a {{'from', 'value'}} object")
        role, value = turn["from"], turn["value"]
        if role not in (HUMAN_ROLE, GPT_ROLE):
            raise _bad(f"turn {i} has unknown role {role!r} (expected 'human' or 'gpt')")
        if not isinstance(value, str):
            raise _bad(f"turn {i} value is {type(value).__name__}, not a string")
        try:  # JSON can carry lone UTF-16 surrogates, which no tokenizer can encode
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise _bad(f"turn {i} ({role}) is not valid Unicode text: {e.reason} at character {e.start}") from None
        turns.append((role, value))
    return turns


def count_image_markers(conversations: Conversation) -> int:
    """Number of `<image>` markers in the sample's text; the dataset compares it with its image count.

    For an image sample that tokenize_conversation accepts, its input_ids hold exactly this many
    IMAGE_TOKEN_INDEX placeholders, in the order the markers appear in the conversation.
    """
    return sum(value.count(IMAGE_MARKER) for _, value in _validated_turns(conversations))


def move_image_markers(value: str) -> str:
    """The reference's per-turn `<image>` placement, extended to several images in one turn.

    One marker (the only case the LLaVA-1.6 recipe has): remove it, strip, prepend "<image>\\n",
    strip again, exactly as the reference. Several markers in one turn: the reference would collapse
    them into one placeholder; we leave that turn unchanged instead (as LLaVA-OneVision does for
    interleaved data) so every image keeps its own placeholder at its position, in text order.
    """
    count = value.count(IMAGE_MARKER)
    if count != 1:
        return value
    value = value.replace(IMAGE_MARKER, "").strip()
    return (IMAGE_MARKER + "\n" + value).strip()


def encode_with_images(text: str, tokenizer: Tokenizer, bos: bool = True) -> list[int]:
    """Like the reference's tokenizer_image_token: split on `<image>`, encode each piece, insert -200."""
    ids: list[int] = [tokenizer.bos_id] if bos else []
    for i, piece in enumerate(text.split(IMAGE_MARKER)):
        if i > 0:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(tokenizer.encode(piece))
    return ids


def vicuna_v1_prompt(turns: Sequence[tuple[str, str]]) -> str:
    """The vicuna_v1 prompt: system + " " + "USER: q ASSISTANT: a</s>" per round. An empty turn
    is its bare role ("USER:", no separator), as in the reference; the mask arithmetic then
    treats it as the reference does (often a tokenization mismatch: the sample is masked)."""
    parts = [VICUNA_SYSTEM, VICUNA_SEP]
    for role, value in turns:
        name, sep = (VICUNA_USER, VICUNA_SEP) if role == HUMAN_ROLE else (VICUNA_ASSISTANT, VICUNA_SEP2)
        parts += [name, ": ", value, sep] if value else [name, ":"]
    return "".join(parts)


def _tokenize_plain(
    turns: list[tuple[str, str]], tokenizer: Tokenizer, has_image: bool
) -> tuple[list[int], list[int]]:
    if len(turns) != 2 or turns[0][0] != HUMAN_ROLE or turns[1][0] != GPT_ROLE:
        raise _bad(f"plain template needs exactly one human turn then one gpt turn, got "
                   f"{[role for role, _ in turns]}")
    # The reference replaces the human turn by the bare marker; we keep one marker per image.
    markers = turns[0][1].count(IMAGE_MARKER)
    if has_image and markers == 0:
        raise _bad("plain template: the human turn of an image sample has no <image> marker")
    if has_image:
        prefix = IMAGE_MARKER * markers
        input_ids = encode_with_images(prefix + turns[1][1] + PLAIN_SEP, tokenizer)
        num_masked = len(encode_with_images(prefix, tokenizer))  # BOS + placeholders
    else:  # a text-only sample's `<image>` is ordinary text (as in vicuna_v1)
        input_ids = [tokenizer.bos_id] + tokenizer.encode(turns[1][1] + PLAIN_SEP)
        num_masked = 1  # BOS
    labels = [IGNORE_INDEX] * num_masked + input_ids[num_masked:]
    return input_ids, labels


def _tokenize_vicuna_v1(
    turns: list[tuple[str, str]],
    tokenizer: Tokenizer,
    has_image: bool,
    stats: Counter | None,
    max_length: int | None,
    sample_id: str | None,
) -> tuple[list[int], list[int]]:
    if turns[0][0] != HUMAN_ROLE:
        if has_image and IMAGE_MARKER in turns[0][1]:
            # Dropping it would silently drop an image the dataset counted.
            raise _bad("the leading gpt turn, which vicuna_v1 drops, holds an <image> marker")
        turns = turns[1:]  # the reference drops a leading gpt turn (and only one)
    if not turns:
        raise _bad("no turns left after dropping the leading gpt turn")
    for i, (role, _) in enumerate(turns):
        expected = HUMAN_ROLE if i % 2 == 0 else GPT_ROLE
        if role != expected:
            raise _bad(f"roles must alternate human/gpt; turn {i} (after dropping a leading gpt "
                       f"turn) is {role!r}")
    if turns[-1][0] != GPT_ROLE:
        # The reference would mask the whole sample (its length check fails); nothing to learn.
        raise _bad("conversation ends with a human turn that has no gpt answer")

    prompt = vicuna_v1_prompt(turns)

    def encode(text: str) -> list[int]:
        # A text-only sample's `<image>` text is ordinary text (the reference calls tokenizer(prompt)).
        return encode_with_images(text, tokenizer, bos=False) if has_image else tokenizer.encode(text)

    rounds = prompt.split(VICUNA_SEP2)
    # The legacy tokenizer encodes each `</s>`-delimited chunk on its own, so the prompt's ids are the
    # rounds' ids joined by eos; tokenizing each round once serves both the ids and the mask.
    round_ids = [encode(rou) for rou in rounds]
    input_ids = [tokenizer.bos_id]
    for i, ids in enumerate(round_ids):
        if i > 0:
            input_ids.append(tokenizer.eos_id)
        input_ids.extend(ids)

    # The reference's mask arithmetic, verbatim in effect: each round costs len(BOS + round) tokens
    # (the BOS standing in for the round's `</s>`), and its instruction len(BOS + "... ASSISTANT: ")
    # - 2 (the BOS, and the trailing space that merges into the answer's first piece). When these
    # counts do not add up to the real length, the reference masks the whole sample.
    labels = list(input_ids)
    sep = VICUNA_SEP + VICUNA_ASSISTANT + ": "
    cur_len = 1
    labels[:cur_len] = [IGNORE_INDEX] * cur_len
    for rou, ids in zip(rounds, round_ids):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        round_len = 1 + len(ids)
        instruction_len = 1 + len(encode(parts[0] + sep)) - 2
        end = min(max(cur_len + instruction_len, cur_len), len(labels))
        labels[cur_len:end] = [IGNORE_INDEX] * (end - cur_len)
        cur_len += round_len
    labels[cur_len:] = [IGNORE_INDEX] * max(len(labels) - cur_len, 0)

    total_len = sum(1 for t in input_ids if t != tokenizer.pad_id)
    # Like the reference, samples reaching the max length skip the check (they are truncated later).
    if (max_length is None or cur_len < max_length) and cur_len != total_len:
        labels = [IGNORE_INDEX] * len(input_ids)
        if stats is not None:
            stats["tokenization_mismatch"] += 1
        logger.warning(
            "tokenization mismatch in sample %s: %d vs. %d tokens; whole sample masked",
            sample_id if sample_id is not None else "<unknown>", cur_len, total_len,
        )
    return input_ids, labels


def tokenize_conversation(
    conversations: Conversation,
    tokenizer: Tokenizer,
    template: str,
    has_image: bool,
    stats: Counter | None = None,
    *,
    max_length: int | None = None,
    sample_id: str | None = None,
) -> tuple[list[int], list[int]]:
    """input_ids (one IMAGE_TOKEN_INDEX per `<image>`, not expanded) and labels (IGNORE_INDEX masked).

    `has_image`: the sample has image(s); only then are markers moved and turned into placeholders
    (a text-only sample's `<image>` text is ordinary text, as in the reference). `stats` counts
    "tokenization_mismatch". `max_length` (the reference's model_max_length) only matters for that
    check, which the reference skips for samples that reach it. Malformed conversations raise
    BadSampleError("bad_conversation", ...); the caller attaches the sample id.
    """
    if template not in TEMPLATES:
        raise ValueError(f"data.template: unknown template {template!r}; expected one of {TEMPLATES}")
    turns = _validated_turns(conversations)
    if has_image:
        turns = [(role, move_image_markers(value)) for role, value in turns]
    if template == "plain":
        input_ids, labels = _tokenize_plain(turns, tokenizer, has_image)
    else:
        input_ids, labels = _tokenize_vicuna_v1(
            turns, tokenizer, has_image, stats, max_length, sample_id
        )
    # The pipeline pairs placeholders with images by count_image_markers(); they must agree.
    expected = sum(value.count(IMAGE_MARKER) for _, value in turns) if has_image else 0
    assert input_ids.count(IMAGE_TOKEN_INDEX) == expected, (input_ids.count(IMAGE_TOKEN_INDEX), expected)
    return input_ids, labels
