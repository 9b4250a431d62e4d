"""tokenize_conversation vs an independent, literal re-statement of the LLaVA reference procedure.

The reference side below follows LLaVA's train.py step by step (preprocess_multimodal, Conversation
.get_prompt with SeparatorStyle.TWO, tokenizer_image_token, preprocess_plain, preprocess_v1 with torch
tensor slicing) and uses transformers' sentencepiece-backed slow tokenizer with legacy=True.
"""

from __future__ import annotations

import copy
import logging
import os
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from titan_llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from titan_llava.data.conversation import count_image_markers, tokenize_conversation
from titan_llava.data.errors import BadSampleError
from titan_llava.data.tokenizer import Tokenizer

MODEL = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "tokenizer", "tokenizer.model")


# ----------------------------------------------------------------------------------------------
# Reference side (independent of titan_llava.data.conversation).


class RefLlamaTokenizer:
    """`tokenizer(text).input_ids` of the slow LlamaTokenizer (add_bos_token=True, legacy=True)."""

    legacy = True

    def __init__(self, model_max_length: int = 4096):
        transformers = pytest.importorskip("transformers")
        self.hf = transformers.SentencePieceBackend(
            vocab_file=MODEL, legacy=True, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
        )
        self.bos_token_id = self.hf.bos_token_id
        self.pad_token_id = self.hf.unk_token_id  # vicuna_v1: tokenizer.pad_token = tokenizer.unk_token
        self.model_max_length = model_max_length

    def __call__(self, text: str, truncation: bool = False) -> SimpleNamespace:
        ids = [self.bos_token_id] + self.hf.convert_tokens_to_ids(self.hf.tokenize(text))
        if truncation:
            ids = ids[: self.model_max_length]
        return SimpleNamespace(input_ids=ids)


REF_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def ref_preprocess_multimodal(source: list[dict], multi_image_extension: bool) -> list[dict]:
    for sentence in source:
        if "<image>" in sentence["value"]:
            if multi_image_extension and sentence["value"].count("<image>") > 1:
                continue  # titan_llava's documented rule: several markers in one turn stay in place
            sentence["value"] = sentence["value"].replace("<image>", "").strip()
            sentence["value"] = "<image>" + "\n" + sentence["value"]
            sentence["value"] = sentence["value"].strip()
    return source


def ref_get_prompt(messages: list[tuple[str, str]]) -> str:
    seps = [" ", "</s>"]
    ret = REF_SYSTEM + seps[0]
    for i, (role, message) in enumerate(messages):
        if message:
            ret += role + ": " + message + seps[i % 2]
        else:
            ret += role + ":"
    return ret


def ref_tokenizer_image_token(prompt: str, tokenizer: RefLlamaTokenizer) -> list[int]:
    prompt_chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]

    def insert_separator(X, sep):
        return [ele for sublist in zip(X, [sep] * len(X)) for ele in sublist][:-1]

    input_ids = []
    offset = 0
    if len(prompt_chunks) > 0 and len(prompt_chunks[0]) > 0 and prompt_chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(prompt_chunks[0][0])
    for x in insert_separator(prompt_chunks, [IMAGE_TOKEN_INDEX] * (offset + 1)):
        input_ids.extend(x[offset:])
    return input_ids


def ref_preprocess_plain(source: list[dict], tokenizer: RefLlamaTokenizer):
    assert len(source) == 2
    assert "<image>" in source[0]["value"]
    source[0]["value"] = "<image>" * source[0]["value"].count("<image>")  # reference: one "<image>"
    conversation = source[0]["value"] + source[1]["value"] + "\n"
    input_ids = torch.tensor(ref_tokenizer_image_token(conversation, tokenizer))
    target = input_ids.clone()
    tokenized_len = len(ref_tokenizer_image_token(source[0]["value"], tokenizer))
    target[:tokenized_len] = IGNORE_INDEX
    return input_ids, target, 0


def ref_preprocess_v1(source: list[dict], tokenizer: RefLlamaTokenizer, has_image: bool):
    roles = {"human": "USER", "gpt": "ASSISTANT"}
    if roles[source[0]["from"]] != "USER":
        source = source[1:]
    messages = []
    for j, sentence in enumerate(source):
        role = roles[sentence["from"]]
        assert role == ["USER", "ASSISTANT"][j % 2]
        messages.append((role, sentence["value"]))
    conversation = ref_get_prompt(messages)

    if has_image:
        input_ids = torch.tensor(ref_tokenizer_image_token(conversation, tokenizer))
    else:
        input_ids = torch.tensor(tokenizer(conversation, truncation=True).input_ids)
    target = input_ids.clone()

    mismatches = 0
    sep = " " + "ASSISTANT" + ": "
    total_len = int(target.ne(tokenizer.pad_token_id).sum())
    rounds = conversation.split("</s>")
    cur_len = 1
    target[:cur_len] = IGNORE_INDEX
    for i, rou in enumerate(rounds):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        if has_image:
            round_len = len(ref_tokenizer_image_token(rou, tokenizer))
            instruction_len = len(ref_tokenizer_image_token(parts[0], tokenizer)) - 2
        else:
            round_len = len(tokenizer(rou).input_ids)
            instruction_len = len(tokenizer(parts[0]).input_ids) - 2
        target[cur_len : cur_len + instruction_len] = IGNORE_INDEX
        cur_len += round_len
    target[cur_len:] = IGNORE_INDEX
    if cur_len < tokenizer.model_max_length:
        if cur_len != total_len:
            target[:] = IGNORE_INDEX
            mismatches += 1
    return input_ids, target, mismatches


def reference(conversations, template: str, has_image: bool, model_max_length: int = 4096):
    """(input_ids, labels, mismatch count) as the reference's LazySupervisedDataset produces them."""
    tokenizer = RefLlamaTokenizer(model_max_length)
    source = copy.deepcopy(conversations)
    if has_image:
        source = ref_preprocess_multimodal(source, multi_image_extension=True)
    if template == "plain":
        ids, labels, mismatches = ref_preprocess_plain(source, tokenizer)
    else:
        ids, labels, mismatches = ref_preprocess_v1(source, tokenizer, has_image)
    return ids.tolist(), labels.tolist(), mismatches


# ----------------------------------------------------------------------------------------------
# Cases.


def conv(*values: str, first: str = "human") -> list[dict]:
    roles = ["human", "gpt"] if first == "human" else ["gpt", "human"]
    return [{"from": roles[i % 2], "value": v} for i, v in enumerate(values)]


VICUNA_CASES = {
    "single_turn_image_first": (conv("<image>\nWhat is shown in this image?", "A cat on a table."), True),
    "image_at_end_of_question": (conv("What is shown in this image?\n<image>", "A cat on a table."), True),
    "image_mid_question": (conv("What is <image> this thing?", "It is a lamp."), True),
    "image_alone": (conv("<image>", "A photo of a street at night."), True),
    "multi_turn_image": (
        conv("<image>\nHow many people are in the photo?", "There are three people.",
             "What are they doing?", "They are playing soccer in a park.",
             "Is it sunny?", "Yes, it is sunny and warm."),
        True,
    ),
    "leading_gpt_turn": (conv("Hello! I am ready.", "<image>\nDescribe the room.", "A bright kitchen.",
                              first="gpt"), True),
    "unicode_digits_newlines": (
        conv("<image>\nRead the menu: café, crème brûlée 世界 🙂", "Prices:\n1. coffee $3.50\n2. tea $2.00\n\n"
             "Total: 5.50 €", "Sum 12 + 30?", "42"),
        True,
    ),
    "answer_starts_with_digit": (conv("<image>\nHow many birds?", "7 birds."), True),
    "answer_starts_with_newline": (conv("<image>\nList them.", "\n- a\n- b"), True),
    "answer_starts_with_punctuation": (conv("<image>\nQuote it.", "\"STOP\" in white letters."), True),
    "spaces_everywhere": (conv("  <image>  What   is  it?  ", "  Two  spaces  ", "again ", " yes"), True),
    "text_only_multi_turn": (
        conv("What is the capital of Japan?", "The capital of Japan is Tokyo.",
             "And of France?", "Paris.\nIt is also the largest city."),
        False,
    ),
    "text_only_leading_gpt": (conv("Hi there.", "Write a poem.", "The sea is wide.", first="gpt"), False),
    "text_only_with_image_text": (conv("What does <image> mean in LLaVA data?", "It marks an image."), False),
    "two_images_two_turns": (conv("<image>\nWhat is this?", "A dog.", "And this one? <image>", "A cat."), True),
    "two_images_one_turn": (conv("Compare <image> and <image> please.", "The first is darker."), True),
    "two_images_one_turn_at_front": (conv("<image>\n<image>\nCompare them.", "They match."), True),
}

PLAIN_CASES = {
    "caption": (conv("<image>\n", "A man riding a motorcycle down a dirt road."), True),
    "caption_question_first": (conv("Describe the image briefly.\n<image>", "Two dogs playing in the snow."),
                               True),
    "caption_unicode_digits": (conv("<image>", "Café at 5th Avenue, 2024: 世界 🙂 50%"), True),
    "caption_leading_space_and_newline": (conv("<image>", " A clock tower.\nIn a town square."), True),
    "caption_two_images": (conv("<image><image>", "Two photos of the same beach."), True),
}


def _tok() -> Tokenizer:
    return Tokenizer(MODEL)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return _tok()


def _check_against_reference(tok, conversations, template, has_image, **kwargs):
    stats = Counter()
    ids, labels = tokenize_conversation(copy.deepcopy(conversations), tok, template, has_image, stats,
                                        **kwargs)
    ref_ids, ref_labels, ref_mismatches = reference(conversations, template, has_image)
    assert ids == ref_ids
    assert labels == ref_labels
    assert stats["tokenization_mismatch"] == ref_mismatches
    return ids, labels


@pytest.mark.parametrize("name", sorted(VICUNA_CASES))
def test_vicuna_v1_matches_reference(tok, name):
    conversations, has_image = VICUNA_CASES[name]
    ids, labels = _check_against_reference(tok, conversations, "vicuna_v1", has_image)
    assert ids.count(IMAGE_TOKEN_INDEX) == (count_image_markers(conversations) if has_image else 0)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    learned = [t for t in labels if t != IGNORE_INDEX]
    assert learned and learned[-1] == tok.eos_id  # every answer is learned, with its </s>
    assert IMAGE_TOKEN_INDEX not in learned


@pytest.mark.parametrize("name", sorted(PLAIN_CASES))
def test_plain_matches_reference(tok, name):
    conversations, has_image = PLAIN_CASES[name]
    ids, labels = _check_against_reference(tok, conversations, "plain", has_image)
    markers = count_image_markers(conversations)
    assert ids[: 1 + markers] == [tok.bos_id] + [IMAGE_TOKEN_INDEX] * markers
    assert labels[: 1 + markers] == [IGNORE_INDEX] * (1 + markers)
    assert labels[1 + markers :] == ids[1 + markers :]


def test_plain_caption_tokens_are_explicit(tok):
    # Spelled out independently of both implementations: BOS, placeholder, caption + "\n" as one chunk.
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=MODEL)
    ids, labels = tokenize_conversation(conv("<image>\nWhat?", "A red bus."), tok, "plain", True)
    assert ids == [1, IMAGE_TOKEN_INDEX] + sp.encode("A red bus.\n")
    assert labels == [IGNORE_INDEX, IGNORE_INDEX] + sp.encode("A red bus.\n")


def test_plain_text_only_has_no_placeholder(tok):
    ids, labels = tokenize_conversation(conv("Describe.", "A quiet street."), tok, "plain", False)
    assert ids == tok.encode("A quiet street.\n", bos=True)
    assert labels == [IGNORE_INDEX] + ids[1:]


@pytest.mark.parametrize("caption", ["A sign that reads <image> here.", "<image>"])
def test_plain_text_only_keeps_a_literal_image_marker_as_text(tok, caption):
    # Without an image the marker is ordinary text (as in vicuna_v1), not a placeholder.
    ids, labels = tokenize_conversation(conv("Describe.", caption), tok, "plain", False)
    assert IMAGE_TOKEN_INDEX not in ids
    assert ids == tok.encode(caption + "\n", bos=True)
    assert labels == [IGNORE_INDEX] + ids[1:]


def test_lone_surrogate_text_is_a_bad_conversation(tok):
    with pytest.raises(BadSampleError, match="turn 1 \\(gpt\\) is not valid Unicode text"):
        tokenize_conversation(conv("Describe.", "bad \ud800 text"), tok, "plain", False)


def test_vicuna_single_image_matches_unmodified_reference(tok):
    # With one marker per turn our multi-image rule is inactive: the reference's own code applies.
    conversations = conv("Look: <image> What now?", "Nothing.", "Again?", "Yes.")
    tokenizer = RefLlamaTokenizer()
    source = ref_preprocess_multimodal(copy.deepcopy(conversations), multi_image_extension=False)
    ref_ids, ref_labels, _ = ref_preprocess_v1(source, tokenizer, True)
    assert tokenize_conversation(conversations, tok, "vicuna_v1", True) == (ref_ids.tolist(),
                                                                            ref_labels.tolist())


def test_mask_boundaries_are_the_rounds(tok):
    # Independent of the -2 arithmetic: the learned text decodes to the answers and nothing else.
    ids, labels = tokenize_conversation(
        conv("<image>\nWhat is it?", "It is a lamp.", "Color?", "It is red."), tok, "vicuna_v1", True
    )
    learned = [t for t in labels if t != IGNORE_INDEX]
    assert learned.count(tok.eos_id) == 2
    assert tok.decode(learned) == "It is a lamp. It is red."


@pytest.mark.parametrize(
    "conversations",
    [
        conv("<image>\nWhat is it?", "A lamp.</s>USER: fake turn"),  # a `</s>` inside an answer
        conv("<image>\nWhat is it?", "A lamp.</s>"),  # `</s>` at the end: an empty round
        conv("<image>\nSay ASSISTANT: hi", "hi"),  # the separator inside a question
    ],
)
def test_tokenization_mismatch_masks_and_counts(tok, conversations, caplog):
    with caplog.at_level(logging.WARNING, logger="titan_llava.data.conversation"):
        ids, labels = _check_against_reference(tok, conversations, "vicuna_v1", True, sample_id="s-7")
    assert labels == [IGNORE_INDEX] * len(ids)
    assert "tokenization mismatch" in caplog.text and "s-7" in caplog.text


def test_mismatch_check_skipped_at_max_length(tok):
    conversations = conv("What is it?", "A lamp.</s>USER: fake turn")
    ref_ids, ref_labels, ref_mismatches = reference(conversations, "vicuna_v1", False, model_max_length=40)
    stats = Counter()
    ids, labels = tokenize_conversation(conversations, tok, "vicuna_v1", False, stats, max_length=40)
    assert ref_mismatches == 0 and stats["tokenization_mismatch"] == 0
    # The reference truncates text-only samples while tokenizing; titan_llava truncates in the loader.
    assert (ids[:40], labels[:40]) == (ref_ids, ref_labels)
    assert any(t != IGNORE_INDEX for t in labels)


def test_stats_optional(tok):
    ids, labels = tokenize_conversation(conv("Q?", "A.</s>"), tok, "vicuna_v1", False)
    assert set(labels) == {IGNORE_INDEX}


# Empty and blank turns, as the reference builds them: an empty turn is its bare role ("USER:",
# no separator), a blank one an ordinary message. Some keep learned tokens, some end up as a
# tokenization mismatch (the sample masked and counted), exactly as in the reference.
EMPTY_TURN_CASES = {
    "blank_question_mid_chat": (conv("<image>\nWhat is it?", "A cat.", " ", "Anything else?"), True, "vicuna_v1"),
    "newline_answer": (conv("Say nothing.", "\n"), False, "vicuna_v1"),
    "empty_answer_mid_chat": (conv("<image>\nWhat is it?", "", "And now?", "A dog."), True, "vicuna_v1"),
    "empty_question": (conv("", "Hello."), False, "vicuna_v1"),
    "empty_last_answer": (conv("Hi?", "Hello.", "Bye?", ""), False, "vicuna_v1"),
    "all_empty": (conv("", ""), False, "vicuna_v1"),
    "blank_caption": (conv("<image>", " "), True, "plain"),
    "empty_caption": (conv("<image>", ""), True, "plain"),
}


@pytest.mark.parametrize("name", sorted(EMPTY_TURN_CASES))
def test_empty_and_blank_turns_match_reference(tok, name):
    conversations, has_image, template = EMPTY_TURN_CASES[name]
    _check_against_reference(tok, conversations, template, has_image)


def test_empty_turn_cases_cover_learning_and_mismatch(tok):
    """The cases above are not all masked: some learn tokens, some are mismatches."""
    outcomes = set()
    for conversations, has_image, template in EMPTY_TURN_CASES.values():
        _, labels, mismatches = reference(conversations, template, has_image)
        outcomes.add("mismatch" if mismatches else "learned" if set(labels) != {IGNORE_INDEX} else "masked")
    assert {"mismatch", "learned"} <= outcomes


def test_count_image_markers():
    assert count_image_markers(conv("<image>\nq", "a")) == 1
    assert count_image_markers(conv("<image> and <image>", "a", "<image>", "b")) == 3
    assert count_image_markers(conv("q", "a")) == 0


@pytest.mark.parametrize(
    "conversations, match",
    [
        (conv("q", "a", "b", first="human")[:2] + [{"from": "gpt", "value": "again"}], "alternate"),
        ([{"from": "human", "value": "q"}, {"from": "human", "value": "q2"}], "alternate"),
        ([{"from": "user", "value": "q"}, {"from": "gpt", "value": "a"}], "unknown role"),
        ([{"from": "human", "value": "q"}, {"from": "gpt"}], "not a"),
        ([{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}], "not a string"),
        ([], "non-empty list"),
        ("human: q", "non-empty list"),
        (conv("a", first="gpt"), "no turns left"),
        (conv("q", "a", "q2"), "ends with a human turn"),
    ],
)
def test_malformed_vicuna_raises(tok, conversations, match):
    with pytest.raises(BadSampleError, match=match) as err:
        tokenize_conversation(conversations, tok, "vicuna_v1", False)
    assert err.value.reason == "bad_conversation"


def test_image_in_dropped_leading_gpt_turn_raises(tok):
    # The reference would silently lose that image; the dataset counts it, so refuse the sample.
    with pytest.raises(BadSampleError, match="leading gpt turn"):
        tokenize_conversation(conv("<image>\nHi.", "Describe.", "A cat.", first="gpt"), tok, "vicuna_v1",
                              True)
    ids, _ = tokenize_conversation(conv("<image>\nHi.", "Describe.", "A cat.", first="gpt"), tok,
                                   "vicuna_v1", False)
    assert IMAGE_TOKEN_INDEX not in ids


def test_dangling_human_turn_is_all_masked_in_reference(tok):
    # Why we refuse it: the reference's own length check fails, so it would learn nothing from it.
    _, ref_labels, ref_mismatches = reference(conv("q", "a", "q2"), "vicuna_v1", False)
    assert ref_mismatches == 1 and set(ref_labels) == {IGNORE_INDEX}


@pytest.mark.parametrize(
    "conversations, has_image, match",
    [
        (conv("<image>", "a", "q", "b"), True, "exactly one human turn"),
        (conv("a", "<image>", first="gpt"), True, "exactly one human turn"),
        (conv("Describe.", "a caption"), True, "no <image> marker"),
    ],
)
def test_malformed_plain_raises(tok, conversations, has_image, match):
    with pytest.raises(BadSampleError, match=match) as err:
        tokenize_conversation(conversations, tok, "plain", has_image)
    assert err.value.reason == "bad_conversation"


def test_unknown_template_is_a_config_error(tok):
    with pytest.raises(ValueError, match="data.template") as err:
        tokenize_conversation(conv("q", "a"), tok, "llama_3", False)
    assert not isinstance(err.value, BadSampleError)


def test_input_not_mutated(tok):
    conversations = conv("What is this?\n<image>", "A cat.")
    before = copy.deepcopy(conversations)
    tokenize_conversation(conversations, tok, "vicuna_v1", True)
    tokenize_conversation(conversations, tok, "plain", True)
    assert conversations == before


def _random_conversation(rng, with_image: bool) -> list[dict]:
    atoms = ["the", "cat", "ASSISTANT", "USER", ":", " ", "  ", "\n", "\t", "7", "2024", "3.5", "é", "世界",
             "🙂", ",", ".", "?", "\"", "Hello", "A", "B", "-", "Ω", "x"]
    rare = ["</s>", "ASSISTANT: ", " ASSISTANT: "]  # provoke the reference's mismatch now and then
    turns = []
    for _ in range(2 * int(rng.integers(1, 4))):
        words = [rare[int(rng.integers(0, len(rare)))] if rng.random() < 0.02 else atoms[int(i)]
                 for i in rng.integers(0, len(atoms), size=int(rng.integers(1, 9)))]
        turns.append("".join(words) + "z")  # never whitespace-only
    if with_image:
        i = int(rng.integers(0, len(turns) // 2)) * 2
        pos = int(rng.integers(0, len(turns[i]) + 1))
        turns[i] = turns[i][:pos] + "<image>" + turns[i][pos:]
    return conv(*turns)


@pytest.mark.parametrize("seed", range(6))
def test_random_conversations_match_reference(tok, seed):
    # Random separators, `</s>`, digits, unicode and whitespace in every position, ten samples a seed.
    import numpy as np

    rng = np.random.default_rng(seed)
    for k in range(10):
        has_image = bool(k % 2)
        conversations = _random_conversation(rng, has_image)
        _check_against_reference(tok, conversations, "vicuna_v1", has_image)
        if has_image and "<image>" in conversations[0]["value"]:
            _check_against_reference(tok, conversations[:2], "plain", True)


def test_mismatch_check_boundary_at_max_length(tok):
    """The reference checks lengths only while cur_len < model_max_length: sweep max_length across
    the sample's own length so the boundary (cur_len == max_length: not checked) is hit exactly."""
    conversations = conv("What is it?", "A lamp.</s>USER: fake turn")
    full_ids, _ = tokenize_conversation(conversations, tok, "vicuna_v1", False)
    for max_length in range(len(full_ids) - 8, len(full_ids) + 3):
        ref_ids, ref_labels, ref_mismatches = reference(conversations, "vicuna_v1", False,
                                                        model_max_length=max_length)
        stats = Counter()
        ids, labels = tokenize_conversation(conversations, tok, "vicuna_v1", False, stats,
                                            max_length=max_length)
        assert stats["tokenization_mismatch"] == ref_mismatches, max_length
        assert (ids[:max_length], labels[:max_length]) == (ref_ids, ref_labels), max_length
