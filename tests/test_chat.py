"""ChatModel, parameters, prompt formats and incremental decoding."""

from __future__ import annotations

import threading

import pytest

from helpers.chat import (
    GenerationParams,
    IncrementalDecoder,
    StopMatcher,
    TransformersChat,
    history_to_messages,
    is_linly_prompt,
    messages_to_pairs,
    parse_linly_prompt,
    render_linly_prompt,
    validate_messages,
)

USER = {"role": "user", "content": "What is the capital of France?"}


@pytest.mark.parametrize(
    ("messages", "field"),
    [
        ([], "must not be empty"),
        ("hello", "must be a list"),
        ([{"role": "robot", "content": "hi"}], "messages[0].role"),
        ([{"role": "user", "content": 3}], "messages[0].content"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "last message"),
        (["hi"], "messages[0] must be a dict"),
    ],
)
def test_bad_messages_name_the_field(messages, field):
    with pytest.raises(ValueError, match=r".*" + field.replace("[", r"\[").replace("]", r"\]")):
        validate_messages(messages)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": 0}, "top_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": -5}, "max_new_tokens"),
        ({"max_new_tokens": 2.5}, "max_new_tokens"),
        ({"top_k": -1}, "top_k"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"temperature": float("nan")}, "temperature"),
        ({"stop": [""]}, "stop"),
        ({"temprature": 0.5}, "unknown parameter"),
    ],
)
def test_bad_params_raise_value_error_naming_the_field(params, field):
    with pytest.raises(ValueError, match=field):
        GenerationParams.from_kwargs(**params)


def test_params_defaults_and_stop_normalised():
    params = GenerationParams.from_kwargs(temperature=0, stop="###", seed=None)
    assert params.greedy and params.stop == ("###",) and params.max_new_tokens == 256


def test_linly_template_is_the_chapters_without_history():
    prompt = render_linly_prompt([{"role": "user", "content": "如何应对压力"}])
    assert prompt == "请用少于25个字回答以下问题 ### Instruction:如何应对压力  ### Response:"


def test_linly_template_folds_history_and_round_trips():
    messages = [
        {"role": "system", "content": "你是数字人助手"},
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！有什么可以帮你？"},
        {"role": "user", "content": "如何应对压力"},
    ]
    prompt = render_linly_prompt(messages)
    assert prompt == (
        "请用少于25个字回答以下问题\n\n你是数字人助手 User: 你好 Bot: 你好！有什么可以帮你？"
        " ### Instruction:如何应对压力  ### Response:"
    )
    assert is_linly_prompt(prompt)
    assert parse_linly_prompt(prompt) == messages


def test_parse_linly_talker_api_client_prompt():
    # What Linly-Talker's LLM/Linly.py sends in api mode: template and history folded in.
    prompt = (
        "请用少于25个字回答以下问题\n\n You are helpful. User: 1+1? Bot: 2 User: 2+2? Bot: 4"
        " ### Instruction:3+3?  ### Response:"
    )
    assert parse_linly_prompt(prompt) == [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "3+3?"},
    ]
    assert not is_linly_prompt("plain question")
    with pytest.raises(ValueError, match="not a Linly prompt"):
        parse_linly_prompt("plain question")


def test_history_shapes_convert_both_ways():
    pairs = [["你好", "你好！"]]
    dicts = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]
    assert history_to_messages(pairs, "再见") == history_to_messages(dicts, "再见")
    assert messages_to_pairs(history_to_messages(pairs, "再见")) == pairs
    with pytest.raises(ValueError, match=r"history\[0\]"):
        history_to_messages([["only one"]], "x")


def test_incremental_decoder_never_emits_replacement_chars(embedded_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_dir)
    text = "数字人助手：你好！今天天气很好，我们去北京的颐和园散步吧。😀 Done."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    # Byte-level BPE splits most Chinese characters over several tokens.
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids]
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) == tokenizer.decode(ids)


def test_stop_matcher_cuts_across_piece_boundaries():
    stopper = StopMatcher(["###"])
    out = [stopper.push(p) for p in ["答案是", "四十二", "#", "#", "# Instruction"]]
    assert "".join(out) == "答案是四十二" and stopper.stopped
    assert stopper.push("more") == "" and stopper.flush() == ""
    held = StopMatcher(["</s>"])
    assert held.push("hello <") == "hello " and held.flush() == "<"


def test_tiny_model_stream_matches_chat_and_greedy_is_deterministic(tiny_chat):
    messages = [USER]
    pieces = list(tiny_chat.stream(messages, temperature=0, max_new_tokens=12))
    assert len(pieces) >= 2
    assert "".join(pieces) == tiny_chat.chat(messages, temperature=0, max_new_tokens=12)


def test_seed_makes_sampling_repeatable(tiny_chat):
    kwargs = {"temperature": 1.0, "max_new_tokens": 10, "seed": 1234}
    assert tiny_chat.chat([USER], **kwargs) == tiny_chat.chat([USER], **kwargs)


def test_closing_a_stream_stops_generation(tiny_chat):
    stream = tiny_chat.stream([USER], temperature=1.0, max_new_tokens=2000, seed=0)
    next(stream)
    stream.close()  # joins the worker: generation must have stopped, not run 2000 tokens
    assert not any(t.name == "dhllm-generate" for t in threading.enumerate())
    assert tiny_chat.lock.acquire(blocking=False)
    tiny_chat.lock.release()


def test_bad_params_fail_before_generation(tiny_chat):
    with pytest.raises(ValueError, match="top_p"):
        tiny_chat.chat([USER], top_p=2)


def test_linly_format_on_a_llama(tiny_llama_dir):
    from helpers.models import load_model

    model, tokenizer = load_model(str(tiny_llama_dir), verbose=False)
    chat = TransformersChat(model, tokenizer, prompt_format="linly")
    history = [
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！"},
        {"role": "user", "content": "如何应对压力"},
    ]
    assert "User: 你好 Bot: 你好！" in chat.render_prompt(history)
    answer = chat.chat(history, temperature=0, max_new_tokens=8)
    assert "### Instruction" not in answer and "请用少于25个字" not in answer  # only new text
    assert chat.default_stop == ("### Instruction", "###")


def test_wrap_serves_a_model_loaded_the_chapters_way(embedded_dir, tiny_llama_dir):
    """Notebook 02 loads with from_pretrained itself; wrap picks the prompt format by name."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_dir, use_fast=False)
    model = AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32,
                                                 device_map="cpu", quantization_config=None)
    model.eval()
    chat = TransformersChat.wrap(model, tokenizer, name="embedded")
    assert chat.model is model and chat.prompt_format == "chat_template"
    answer = chat.chat([{"role": "user", "content": "What is the capital of France?"}],
                       temperature=0, max_new_tokens=12)
    assert "Paris" in answer
    # A registry name brings its format (Linly's template), even on a tokenizer with a template.
    assert TransformersChat.wrap(model, tokenizer, name="linly-7b").prompt_format == "linly"
    # A folder outside the registry: no chat template means the Linly template.
    llama_tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    llama_tokenizer.chat_template = None
    assert TransformersChat.wrap(model, llama_tokenizer, name=str(tiny_llama_dir)).prompt_format == "linly"


def test_remote_chat_format_passes_history_pairs(embedded_dir):
    class RemoteCodeModel:  # the shape of Qwen-1 / ChatGLM3 remote code: model.chat(...)
        def chat(self, tokenizer, query, history=None, **kwargs):
            self.seen = (query, history, kwargs)
            return f"echo {query}", [*history, (query, "echo")]

    remote = RemoteCodeModel()
    chat = TransformersChat(remote, tokenizer=None, prompt_format="remote_chat")
    answer = chat.chat(
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
         {"role": "user", "content": "c"}],
        temperature=0,
        max_new_tokens=5,
    )
    assert answer == "echo c"
    assert remote.seen == ("c", [("a", "b")], {"max_new_tokens": 5, "top_p": 1.0, "do_sample": False})
    assert not chat.can_batch


@pytest.mark.slow
def test_embedded_model_answers_sensibly_and_deterministically(embedded_chat):
    answer = embedded_chat.chat([USER], temperature=0, max_new_tokens=30)
    assert answer == "The capital of France is Paris."


@pytest.mark.slow
def test_embedded_model_streams_chinese_without_replacement_chars(embedded_chat):
    messages = [{"role": "user", "content": "请用中文介绍一下北京的名胜古迹。"}]
    pieces = list(embedded_chat.stream(messages, temperature=0, max_new_tokens=40))
    assert pieces and not any("\ufffd" in p for p in pieces)
