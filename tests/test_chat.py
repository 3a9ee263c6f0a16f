"""Multi-turn chat (lm/chat.py): prompts laid out by the template, streaming, the context window,
slash commands, RAG context, and the `lm chat` terminal loop."""

import io

import pytest
import torch

import lm
from lm.chat import Chat, command, run
from lm.retrieval import Retriever

TEXT = "Human: Assistant: what is a cat? a cat is an animal. /0123456789 Context:\n"


@pytest.fixture
def model():
    torch.manual_seed(0)
    tok = lm.CharTokenizer.train(TEXT)
    return lm.GPT(lm.ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, d_model=16),
                  tokenizer=tok).eval()


def test_a_turn_streams_the_same_text_as_greedy_generation_from_the_template_prompt(model):
    chat = Chat(model, config=lm.GenerationConfig(max_new_tokens=20, temperature=0))
    reply = "".join(chat.ask("what is a cat?"))
    prompt = lm.chat_template("human").prompt([{"role": "user", "content": "what is a cat?"}])
    expected = model.generate(prompt, max_new_tokens=20, temperature=0, stop=["\n\n", "\nHuman:"])
    assert reply == expected
    assert chat.messages == [{"role": "user", "content": "what is a cat?"},
                             {"role": "assistant", "content": reply.strip()}]


def test_the_second_turn_sees_the_first(model):
    chat = Chat(model, config=lm.GenerationConfig(max_new_tokens=5, temperature=0))
    list(chat.ask("a cat"))
    ids, dropped = chat._prompt_ids("is it?")
    assert dropped == 0
    text = model.tokenizer.decode(ids)
    assert text.startswith("Human: a cat\nAssistant:") and text.endswith("Human: is it?\nAssistant:")


def test_old_exchanges_are_dropped_to_fit_the_context(model):
    chat = Chat(model, config=lm.GenerationConfig(max_new_tokens=16, temperature=0))
    for _ in range(4):
        list(chat.ask("what is a cat?"))
    assert chat.dropped >= 1 and chat.messages[-1]["role"] == "assistant"
    ids, _ = chat._prompt_ids("what is a cat?")
    assert len(ids) <= model.config.block_size - 16
    assert model.tokenizer.decode(ids).endswith("Human: what is a cat?\nAssistant:")


def test_slash_commands_change_settings_and_reject_bad_values(model):
    chat = Chat(model)
    assert command(chat, "/temperature 0.5") == "(temperature = 0.5)" and chat.config.temperature == 0.5
    assert command(chat, "/top_k 5") == "(top_k = 5)"
    assert "top_p" in command(chat, "/top_p 2") and chat.config.top_p is None  # out of range: unchanged
    assert "'abc'" in command(chat, "/top_k abc")
    assert "unknown command /shout" in command(chat, "/shout")
    chat.messages = [{"role": "user", "content": "x"}]
    assert command(chat, "/reset") == "(conversation reset)" and chat.messages == []
    assert command(chat, "/quit") is None


def test_rag_context_goes_in_a_system_message_for_that_turn(model):
    retriever = Retriever(["a cat is an animal.", "0123456789", "9876543210"])
    chat = Chat(model, config=lm.GenerationConfig(max_new_tokens=2, temperature=0), retriever=retriever, rag_k=1)
    text = model.tokenizer.decode(chat._prompt_ids("what is a cat?")[0])
    assert text.startswith("Context:\na cat is an animal.\n\nHuman: what is a cat?")
    chat.set("max_new_tokens", 16)  # no room for the context now: the question comes first
    assert model.tokenizer.decode(chat._prompt_ids("what is a cat?")[0]) == "Human: what is a cat?\nAssistant:"


def test_the_terminal_loop(model):
    lines = iter(["/temperature 0", "what is a cat?", "", "/help", "/quit"])
    out = io.StringIO()
    chat = Chat(model, config=lm.GenerationConfig(max_new_tokens=8))
    assert run(chat, read=lambda _: next(lines), out=out) == 0
    printed = out.getvalue()
    assert "(temperature = 0.0)" in printed and "model> " in printed and "/reset" in printed
    assert len(chat.messages) == 2


def test_end_of_input_ends_the_loop(model):
    def read(_):
        raise EOFError

    assert run(Chat(model), read=read, out=io.StringIO()) == 0


def test_lm_chat_command(model, tmp_path, monkeypatch, capsys):
    from lm.cli import main

    ckpt = lm.save_checkpoint(tmp_path / "m.pt", model)
    monkeypatch.setattr("sys.stdin", io.StringIO("what is a cat?\n/quit\n"))
    assert main(["chat", "--ckpt", str(ckpt), "--device", "cpu", "--temperature", "0", "--max_new_tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert "model> " in out and "'human' template" in out
    assert main(["chat", "--ckpt", str(tmp_path / "none.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_message_the_tokenizer_cannot_encode_is_reported_and_the_chat_goes_on(model):
    lines = iter(["what is a dog?", "what is a cat?", "/quit"])  # "d", "o", "g" are not in the vocabulary
    out = io.StringIO()
    chat = Chat(model, config=lm.GenerationConfig(max_new_tokens=4, temperature=0))
    assert run(chat, read=lambda _: next(lines), out=out) == 0
    assert "(error: " in out.getvalue() and "'d'" in out.getvalue()
    assert [m["content"] for m in chat.messages if m["role"] == "user"] == ["what is a cat?"]
