"""helpers.speech.sentences: sentence splitting for text-to-speech, whole and streamed."""

from __future__ import annotations

import ast
import random
import sys
from pathlib import Path

import pytest

import helpers.speech.sentences
from helpers.speech import (
    FIRST_MIN_CHARS,
    MAX_CHARS,
    MIN_CHARS,
    RULES,
    SentenceSplitter,
    split_sentences,
    stream_sentences,
)

VARIED = [
    "",
    "   ",
    "\n\n",
    "你好",
    "你好！今天天气不错。我们出发吧？",
    "  leading spaces. And trailing   ",
    "Mr. Smith met Dr. Lee at 3 p.m. today. J. K. Rowling lives in the U.S. now.",
    "中文和English混在一起，好不好？Yes! 当然。v1.2.3 发布了；3.14 是 π。",
    "他说：“好的。”然后走了……\n\n第二段\r\n第三段",
    "emoji 😀😀！真的吗？！“是的！”」』】》）",
    "共有3,000人，会议在10:30开始，地址是https://x.cn/a?q=1&b=2。",
    "很长的一句话没有任何标点" * 40,
    " ".join(f"word{i}" for i in range(200)),
    "！！！？？？。。。" * 30,
    "a" * 150 + "中文" * 50,
    "1. First. 2. Second. Fig. 3 shows it, etc. and so on. No. 5 is it.",
]


def chunked(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), min(max(len(text) - 1, 0), rng.randint(0, 30))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


def test_defaults_are_ordered():
    assert 0 < FIRST_MIN_CHARS < MIN_CHARS < MAX_CHARS


@pytest.mark.parametrize("rule", RULES, ids=[f"rule{i}" for i in range(len(RULES))])
def test_each_rule_example_splits_where_it_is_marked(rule):
    assert rule.rule and "|" in rule.example
    assert split_sentences(rule.example.replace("|", "")) == rule.example.split("|")


def test_chinese_strong_punctuation():
    text = "你好！今天天气不错。我们出发吧？"
    assert split_sentences(text) == ["你好！", "今天天气不错。", "我们出发吧？"]


@pytest.mark.parametrize("mark", ["；", ";"])
def test_semicolon_is_strong(mark):
    assert split_sentences(f"第一点{mark}第二点{mark}第三点") == [
        f"第一点{mark}", f"第二点{mark}", "第三点"]


def test_runs_and_closing_quotes_stay_with_the_sentence():
    assert split_sentences("真的吗？！“是的！！”他说……好吧?!") == [
        "真的吗？！", "“是的！！”", "他说……", "好吧?!"]
    assert split_sentences("《书》。（注：见上。）下一句") == ["《书》。", "（注：见上。）", "下一句"]


def test_newlines_end_sentences_and_stay_with_them():
    assert split_sentences("第一行\n第二行\n\n\n第三行\n") == ["第一行\n", "第二行\n\n\n", "第三行\n"]
    assert split_sentences("\n\n开头的空行") == ["\n\n开头的空行"]


def test_english_sentences_keep_their_spaces():
    assert split_sentences("Hello there! How are you? Fine.  Thanks.") == [
        "Hello there! ", "How are you? ", "Fine.  ", "Thanks."]


@pytest.mark.parametrize("text", [
    "Pi is 3.14 and e is 2.718 today.", "Version v1.2.3 is out now.", "See example.com for more.",
    "Done.然后继续。",
])
def test_a_full_stop_without_a_space_after_it_does_not_split(text):
    assert split_sentences(text) == [text]


@pytest.mark.parametrize("abbreviation", [
    "Mr.", "Mrs.", "Ms.", "Dr.", "Prof.", "Sr.", "Jr.", "St.", "vs.", "etc.", "e.g.", "i.e.",
    "U.S.", "a.m.", "p.m.", "No.", "Fig.", "MR.", "Etc.",
])
def test_no_cut_after_abbreviations(abbreviation):
    text = f"We saw {abbreviation} here today. Next."
    assert split_sentences(text) == [f"We saw {abbreviation} here today. ", "Next."]


def test_initials_and_list_numbers_do_not_end_sentences():
    assert split_sentences("J. K. Rowling wrote it. Then what.") == [
        "J. K. Rowling wrote it. ", "Then what."]
    assert split_sentences("1. First thing. 2. Second.") == ["1. First thing. ", "2. Second."]


def test_lowercase_no_the_pronoun_i_and_numbers_end_sentences():
    assert split_sentences("I said no. So did I. The answer is 42. Yes.") == [
        "I said no. ", "So did I. ", "The answer is 42. ", "Yes."]


def test_ellipsis_of_full_stops_ends_a_sentence():
    assert split_sentences("Wait... what? Mr... ok") == ["Wait... ", "what? ", "Mr... ", "ok"]


def test_first_clause_goes_out_early_but_not_a_two_character_one():
    # "好的，" (3 < FIRST_MIN_CHARS) waits; the first clause of >= 4 characters ends the sentence.
    assert split_sentences("好的，我来回答这个问题，首先……") == ["好的，我来回答这个问题，", "首先……"]
    assert split_sentences("好的呀，我来回答这个问题，首先……") == ["好的呀，", "我来回答这个问题，首先……"]
    assert split_sentences("好的，我来回答这个问题，首先……", first_min_chars=2) == [
        "好的，", "我来回答这个问题，首先……"]


def test_weak_punctuation_after_the_first_sentence_needs_min_chars():
    text = "好。首先是，第一个问题，然后是第二个问题，最后、结束"
    # "然后是第二个问题，" has 9 < MIN_CHARS characters, so that sentence goes on to "最后、".
    assert split_sentences(text) == ["好。", "首先是，第一个问题，", "然后是第二个问题，最后、", "结束"]
    assert split_sentences(text, min_chars=3) == [
        "好。", "首先是，", "第一个问题，", "然后是第二个问题，", "最后、", "结束"]


@pytest.mark.parametrize("text", [
    "一共有3,000,000个人在这里", "会议在10:30开始请准时到场", "会议在10：30开始请准时到场",
    "访问https://example.com/a,b:c获得帮助", "搜索https://x.cn/s?q=1;p=2获得帮助",
])
def test_no_cut_inside_numbers_times_and_urls(text):
    assert split_sentences(text, min_chars=1, first_min_chars=1) == [text]


def test_a_400_character_run_on_is_cut_at_the_cap():
    text = "很长的一句话没有任何标点" * 33 + "完成了吗"
    assert len(text) == 400
    pieces = split_sentences(text)
    assert "".join(pieces) == text
    assert [len(piece) for piece in pieces] == [MAX_CHARS] * 6 + [400 - 6 * MAX_CHARS]


def test_an_english_run_on_is_cut_between_words():
    words = [f"word{i}" for i in range(120)]
    pieces = split_sentences(" ".join(words), max_chars=40)
    assert len(pieces) > 5
    assert all(len(piece.strip()) <= 40 for piece in pieces)
    assert [word for piece in pieces for word in piece.split()] == words  # no word was cut


def test_a_run_on_prefers_a_weak_mark_then_a_script_boundary():
    # The comma is too early to end the sentence by itself, but it is the best place to cut.
    assert split_sentences("好。嗯，" + "中" * 30, max_chars=20) == [
        "好。", "嗯，", "中" * 20, "中" * 10]
    # No space: cut between Chinese and ASCII, never inside "Python3".
    assert split_sentences("中" * 15 + "Python3" + "文" * 5, max_chars=20) == [
        "中" * 15, "Python3" + "文" * 5]


def test_a_run_on_is_not_cut_before_its_own_punctuation():
    pieces = split_sentences("一" * 59 + "！！后面", max_chars=60)
    assert pieces == ["一" * 58, "一！！", "后面"]


def test_one_long_ascii_token_is_cut_at_the_cap():
    url = "https://example.com/" + "a" * 100
    assert split_sentences(url) == [url[:MAX_CHARS], url[MAX_CHARS:]]


@pytest.mark.parametrize("text", VARIED)
def test_pieces_join_back_to_the_input_and_respect_the_cap(text):
    for options in ({}, {"max_chars": 7}, {"max_chars": 1}, {"min_chars": 0, "first_min_chars": 0}):
        pieces = split_sentences(text, **options)
        assert "".join(pieces) == text
        assert all(pieces)
        assert all(piece.strip() for piece in pieces) or not text.strip()
        assert all(len(p.strip()) <= options.get("max_chars", MAX_CHARS) for p in pieces)


@pytest.mark.parametrize("text", VARIED)
def test_any_chunking_streams_the_same_sentences(text):
    rng = random.Random(text)
    whole = split_sentences(text)
    assert list(stream_sentences(text)) == whole  # one character at a time
    for _ in range(20):
        assert list(stream_sentences(chunked(text, rng))) == whole


def test_random_texts_stream_like_they_split():
    rng = random.Random(7)
    alphabet = [*"中文好ab Z09.,:;!?。，、：；！？…”\")）\n", "Mr", "e.g", "3.14", "😀"]
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 120)))
        whole = split_sentences(text, max_chars=15)
        assert "".join(whole) == text
        assert list(stream_sentences(chunked(text, rng), max_chars=15)) == whole


def test_stream_yields_before_the_input_ends():
    got: list[str] = []

    def chunks():
        yield "你好！"
        yield "我是"
        assert got == ["你好！"], "the first sentence must be out before more input is read"
        yield "数字人。"

    for sentence in stream_sentences(chunks()):
        got.append(sentence)
    assert got == ["你好！", "我是数字人。"]


def test_a_mark_at_the_end_of_a_piece_waits_for_the_next_character():
    splitter = SentenceSplitter()
    assert splitter.push("你好！") == []
    assert splitter.push("！") == []
    assert splitter.push("”") == []
    assert splitter.push("我") == ["你好！！”"]
    assert splitter.flush() == ["我"]
    assert splitter.flush() == []
    assert splitter.push("Hi! ") == [] and splitter.flush() == ["Hi! "]  # reusable after flush


def test_streaming_keeps_only_the_unfinished_sentence():
    splitter = SentenceSplitter()
    for char in "你好，世界！This is Mr. Smith, a test. " * 2000:
        splitter.push(char)
        assert len(splitter._buf) <= MAX_CHARS + 2


def test_bad_max_chars_is_refused():
    with pytest.raises(ValueError):
        SentenceSplitter(max_chars=0)


def test_the_splitter_uses_the_standard_library_only():
    tree = ast.parse(Path(helpers.speech.sentences.__file__).read_text(encoding="utf-8"))
    modules = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no relative imports"
            modules.append(node.module or "")
    assert modules
    assert {m.split(".")[0] for m in modules} <= set(sys.stdlib_module_names) | {"__future__"}
