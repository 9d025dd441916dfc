"""Prompt/label construction for every format: the labels cover exactly the answer and its end
token, and the generation prompt is exactly the prefix of the training sequence."""
from __future__ import annotations

import pytest
import torch

from edge_glass.decoders.prompt import (
    IGNORE, ChatPrompt, PlainPrompt, WordPrompt, WordTokenizer, collate, collate_prompts, prompt_format_for,
)

from .conftest import ANSWERS, QUESTIONS

# fixture name -> (expected format class, text the label tokens must decode to for answer a)
FORMATS = {
    "word_tokenizer": (WordPrompt, lambda tok, a: f"{a} <eos>"),
    "qwen2_tokenizer": (ChatPrompt, lambda tok, a: f"{a}<|im_end|>"),
    "smollm2_tokenizer": (ChatPrompt, lambda tok, a: f"{a}<|im_end|>"),
    "plain_tokenizer": (PlainPrompt, lambda tok, a: f" {a}{tok.eos_token}"),
}


def _decode(tok, ids):
    if isinstance(tok, WordTokenizer):
        return tok.decode(ids, skip_special=False)
    return tok.decode(ids, skip_special_tokens=False)


@pytest.fixture(params=list(FORMATS))
def fmt(request):
    tok = request.getfixturevalue(request.param)
    cls, expected = FORMATS[request.param]
    f = prompt_format_for(tok)
    assert type(f) is cls
    return tok, f, expected


@pytest.mark.parametrize("question,answer", list(zip(QUESTIONS, ANSWERS)))
def test_labels_decode_to_exactly_the_answer_and_end_token(fmt, question, answer):
    tok, f, expected = fmt
    enc = f.encode(question, answer)
    labelled = [t for t in enc.labels if t != IGNORE]
    assert _decode(tok, labelled) == expected(tok, answer)
    assert labelled[-1] == f.eos_id
    assert enc.labels[: enc.prompt_len] == [IGNORE] * enc.prompt_len
    assert enc.labels[enc.prompt_len:] == enc.input_ids[enc.prompt_len:]  # contiguous, nothing else labelled


@pytest.mark.parametrize("question,answer", list(zip(QUESTIONS, ANSWERS)))
def test_generation_prompt_is_the_prefix_of_the_training_sequence(fmt, question, answer):
    tok, f, _ = fmt
    enc = f.encode(question, answer)
    prompt = f.prompt_ids(question)
    assert enc.input_ids[: len(prompt)] == prompt and enc.prompt_len == len(prompt)
    # and decoding the generated answer ids (then anything after the end token) gives the answer back
    assert f.decode(f.answer_ids(answer) + [f.pad_id, 5]) == answer


@pytest.mark.parametrize("name", ["qwen2_tokenizer", "smollm2_tokenizer"])
def test_chat_sequence_is_the_templates_own_conversation(request, name):
    """The training ids equal the tokenized template rendering of the whole conversation (up to
    the end-of-turn token), and the prompt ends with the template's assistant header."""
    tok = request.getfixturevalue(name)
    f = prompt_format_for(tok)
    for question, answer in zip(QUESTIONS, ANSWERS):
        enc = f.encode(question, answer)
        full = f.render(question, answer)
        upto_end = full[: full.rindex("<|im_end|>") + len("<|im_end|>")]
        assert tok.decode(enc.input_ids, skip_special_tokens=False) == upto_end
        assert enc.input_ids == tok(upto_end, add_special_tokens=False)["input_ids"]
        assert tok.decode(f.prompt_ids(question), skip_special_tokens=False).endswith("<|im_start|>assistant\n")


def test_smollm2_prompt_has_its_default_system_turn_and_system_override_replaces_it(smollm2_tokenizer):
    default = smollm2_tokenizer.decode(prompt_format_for(smollm2_tokenizer).prompt_ids("hi"))
    assert "You are a helpful AI assistant named SmolLM" in default
    custom = smollm2_tokenizer.decode(prompt_format_for(smollm2_tokenizer, system="Answer briefly.").prompt_ids("hi"))
    assert "Answer briefly." in custom and "SmolLM" not in custom


def test_chat_prompt_rejects_a_template_whose_answer_does_not_follow_the_prompt(qwen2_tokenizer):
    import copy

    tok = copy.deepcopy(qwen2_tokenizer)
    tok.chat_template = ("{% for m in messages %}{{ m.role + ': ' + m.content + '\\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ 'assistant (thinking):' }}{% endif %}")
    with pytest.raises(ValueError, match="does not render the assistant turn"):
        ChatPrompt(tok)
    assert isinstance(prompt_format_for(tok, style="plain"), PlainPrompt)


def test_word_tokenizer_round_trips_through_json(tmp_path, word_tokenizer):
    path = tmp_path / "tok.json"
    word_tokenizer.save(path)
    loaded = WordTokenizer.load(path)
    assert loaded.tokens == word_tokenizer.tokens
    assert loaded.encode("What COLOR is the shape?") == word_tokenizer.encode("what color is the shape ?")
    assert loaded.encode("purple") == [loaded.unk_id]
    assert WordTokenizer.build(reversed(QUESTIONS + ANSWERS)).tokens == word_tokenizer.tokens  # order-independent


def test_collate_pads_training_batches_right_and_prompts_left(word_tokenizer):
    f = WordPrompt(word_tokenizer)
    encs = [f.encode(q, a) for q, a in zip(QUESTIONS[:2], ANSWERS[:2])]
    b = collate(encs, f.pad_id)
    n0 = len(encs[0].input_ids)
    assert b["input_ids"].shape == (2, max(len(e.input_ids) for e in encs))
    assert b["attention_mask"][0].tolist() == [True] * n0 + [False] * (b["input_ids"].shape[1] - n0)
    assert (b["labels"][~b["attention_mask"]] == IGNORE).all()
    p = collate_prompts([f.prompt_ids(q) for q in QUESTIONS[:2]], f.pad_id)
    assert p["attention_mask"][:, -1].all()
    short = len(f.prompt_ids(QUESTIONS[0]))
    assert p["input_ids"][0, -short:].tolist() == f.prompt_ids(QUESTIONS[0])
    assert torch.equal(p["attention_mask"][0], torch.arange(p["input_ids"].shape[1]) >= p["input_ids"].shape[1] - short)
