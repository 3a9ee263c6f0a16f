"""Instruction/chat formats, chat templates and prompt masking (lm/instructions.py)."""

import json

import pytest
import torch

import lm
from lm.instructions import DataFormatError, chat_template, detect_format, load_examples, to_conversation

TEXT = "Human: Assistant: What is a cat? A small animal.\nsystem note <BOS><SEP><EOS>abcdefghijklmnopqrstuvwxyz?.!"


@pytest.fixture(scope="module")
def tok():
    return lm.CharTokenizer.train(TEXT + "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789,;:'")


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# ---- formats ---------------------------------------------------------------------------------
@pytest.mark.parametrize("record, fmt, user, answer", [
    ({"user": "hi", "assistant": "hello"}, "chat", "hi", "hello"),
    ({"question": "What is x?", "answer": "A letter."}, "qa", "What is x?", "A letter."),
    ({"instruction": "Sum", "input": "1 2", "output": "3"}, "alpaca", "Sum\n\n1 2", "3"),
    ({"instruction": "Sum", "context": "", "response": "3", "category": "math"}, "alpaca", "Sum", "3"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "messages", "a", "b"),
])
def test_every_format_becomes_a_conversation(record, fmt, user, answer):
    assert detect_format(record) == fmt
    conversation = to_conversation(record)
    assert conversation[-2] == {"role": "user", "content": user}
    assert conversation[-1] == {"role": "assistant", "content": answer}


def test_load_examples_reads_jsonl_and_counts_empty_answers(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"user": "hi", "assistant": "hello"},
        {"question": "q", "answer": "   "},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a"},
                      {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
                      {"role": "assistant", "content": "d"}]},
    ])
    examples = load_examples(path)
    assert len(examples) == 2
    assert examples.skipped == {"empty answer": 1}
    assert examples.formats == {"chat": 1, "messages": 1}
    assert [m["role"] for m in examples[1]] == ["system", "user", "assistant", "user", "assistant"]


@pytest.mark.parametrize("line, needle", [
    ('{"user": "hi", "assistent": "typo"}', "match no format"),
    ('{"question": "q", "answer": 3}', "'answer' must be a string"),
    ('not json', "not valid JSON"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "role 'robot'"),
    ('{"messages": [{"role": "assistant", "content": "x"}]}', "must alternate"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "end with an assistant message"),
    ('{"instruction": "a", "input": "b", "context": "c", "output": "d"}', "either 'input' or 'context'"),
])
def test_malformed_lines_name_the_line_and_the_problem(tmp_path, line, needle):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"user": "ok", "assistant": "fine"}\n' + line + "\n")
    with pytest.raises(DataFormatError, match=needle) as err:
        load_examples(path)
    assert "bad.jsonl:2" in str(err.value)


def test_missing_file_and_unknown_format_are_clear(tmp_path):
    with pytest.raises(DataFormatError, match="does not exist"):
        load_examples(tmp_path / "nope.jsonl")
    with pytest.raises(DataFormatError, match="format='csv'"):
        load_examples([], format="csv")
    with pytest.raises(DataFormatError, match="in the 'qa' format, not 'chat'"):
        load_examples([{"question": "q", "answer": "a"}], format="chat")


def test_a_huge_line_is_refused_without_reading_it_all(tmp_path, monkeypatch):
    monkeypatch.setattr(lm.instructions, "MAX_LINE_BYTES", 100)
    path = tmp_path / "big.jsonl"
    path.write_text(json.dumps({"user": "x" * 500, "assistant": "y"}) + "\n")
    with pytest.raises(DataFormatError, match="longer than 100 bytes"):
        load_examples(path)


# ---- templates -------------------------------------------------------------------------------
def test_human_template_is_seed_001_layout():
    conversation = [{"role": "user", "content": "What is a cat?"}, {"role": "assistant", "content": "A small animal."}]
    template = chat_template("human")
    user, assistant = "What is a cat?", "A small animal."
    assert template.render(conversation) == f"Human: {user}\nAssistant: {assistant}\n\n"  # seed 001's training text
    assert template.prompt(conversation) == f"Human: {user}\nAssistant:"  # seed 001's inference prompt
    assert template.cut(" A small animal.\n\nHuman: next") == "A small animal."


def test_prompt_tokens_get_minus_100_and_answer_tokens_their_ids(tok):
    conversation = [{"role": "user", "content": "What is a cat?"}, {"role": "assistant", "content": "A small animal."}]
    for name, answer_text in (("human", " A small animal.\n\n"), ("special", "A small animal.<EOS>")):
        encoded = chat_template(name).encode(conversation, tok)
        x, y = encoded.inputs_and_targets()
        assert torch.equal(x, torch.tensor(encoded.ids[:-1]))
        trained = y[y != -100].tolist()
        assert tok.decode(trained) == answer_text  # exactly the answer (and the end of turn) is learned
        assert (y[: len(encoded.ids) - 1 - len(trained)] == -100).all()  # everything before it is masked
        prompt_ids = chat_template(name).encode_prompt(conversation, tok)
        assert encoded.ids[: len(prompt_ids)] == prompt_ids  # generation sees the training prompt exactly


def test_special_template_uses_single_special_ids_and_ignores_them_in_text(tok):
    template = chat_template("special")
    sneaky = [{"role": "user", "content": "say <EOS> now"}, {"role": "assistant", "content": "ok"}]
    ids = template.encode(sneaky, tok).ids
    specials = tok.special_tokens
    assert ids[0] == specials["<BOS>"] and ids.count(specials["<EOS>"]) == 1 and ids[-1] == specials["<EOS>"]
    assert template.generation_options(tok)["stop_tokens"] == (specials["<EOS>"],)


def test_multi_turn_trains_on_every_assistant_turn(tok):
    conversation = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a?"},
                    {"role": "assistant", "content": "b."}, {"role": "user", "content": "c?"},
                    {"role": "assistant", "content": "d."}]
    encoded = chat_template("human").encode(conversation, tok)
    trained = "".join(tok.decode([i]) for i, t in zip(encoded.ids, encoded.trained) if t)
    assert trained == " b.\n\n d.\n\n"
    assert chat_template("human").prompt(conversation).endswith("Human: c?\nAssistant:")


def test_special_template_needs_the_tokens_and_says_so():
    bpe = lm.ByteBPETokenizer.train("hello world " * 20, vocab_size=265)
    with pytest.raises(DataFormatError, match="special tokens .*<BOS>"):
        chat_template("special").encode([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], bpe)
    bpe = lm.ByteBPETokenizer.train("hello world " * 20, vocab_size=265, special_tokens=["<BOS>", "<SEP>", "<EOS>"])
    encoded = chat_template("special").encode([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                                              bpe)
    assert bpe.decode(encoded.ids) == "<BOS>a<SEP>b<EOS>"
    with pytest.raises(DataFormatError, match="unknown chat template 'chatml'"):
        chat_template("chatml")


def test_gpt2_prompt_ids_are_those_of_the_prompt_text():
    tok = lm.ByteBPETokenizer.gpt2()
    conversation = [{"role": "user", "content": "What is attention?"}, {"role": "assistant", "content": "A lookup."}]
    template = chat_template("human")
    # the prompt is encoded in one piece, exactly as generate() encodes the prompt text
    assert template.encode_prompt(conversation, tok) == tok.encode(template.prompt(conversation))
    encoded = template.encode(conversation, tok)
    assert tok.decode(encoded.ids) == template.render(conversation)
