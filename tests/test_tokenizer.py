"""Tokenizer against transformers' SmolLM2 tokenizer, and the incremental detokenizer."""

from __future__ import annotations

import pytest

from server.errors import InvalidRequest
from server.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = [
    "Hello, world!",
    "  leading spaces and\ttabs\nnew lines  ",
    "Emoji 😀👍🏽 and CJK 日本語のテキスト, 한국어, 中文字符 mixed with ASCII.",
    "<|im_start|>user\nspecial tokens inline<|im_end|>",
    "",
]
MULTIBYTE = "Grüße 😀 from 東京! 🎉🎉 Ünïcödé — “quotes” 👩‍👩‍👧 ok. 日本語のテキストです。"
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2? 😀"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 日本?"},
]


def test_encode_decode_match_transformers(smollm2_tokenizer, smollm2_hf_tokenizer):
    for text in TEXTS:
        for special in (True, False):
            ids = smollm2_tokenizer.encode(text, add_special_tokens=special)
            assert ids == smollm2_hf_tokenizer.encode(text, add_special_tokens=special)
            for skip in (True, False):
                assert smollm2_tokenizer.decode(ids, skip) == smollm2_hf_tokenizer.decode(
                    ids, skip_special_tokens=skip
                )
    assert smollm2_tokenizer.eos_token_ids == (2,)
    assert smollm2_tokenizer.vocab_size == 49152


def test_chat_template_matches_transformers(smollm2_tokenizer, smollm2_hf_tokenizer):
    for gen in (True, False):
        ids = smollm2_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=gen)
        expected = smollm2_hf_tokenizer.apply_chat_template(
            MESSAGES, add_generation_prompt=gen, tokenize=True, return_dict=False
        )
        assert ids == list(expected)
    text = smollm2_tokenizer.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert smollm2_tokenizer.apply_chat_template(parts) == smollm2_tokenizer.apply_chat_template(
        [{"role": "user", "content": "ab"}]
    )


@pytest.mark.parametrize(
    "messages",
    [
        [],
        "hi",
        [["user", "hi"]],
        [{"content": "no role"}],
        [{"role": "wizard", "content": "hi"}],
        [{"role": "user", "content": 3}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
    ],
)
def test_malformed_messages_are_invalid_requests(smollm2_tokenizer, messages):
    with pytest.raises(InvalidRequest) as e:
        smollm2_tokenizer.apply_chat_template(messages)
    assert e.value.status == 400 and e.value.param == "messages"


def test_no_chat_template_is_an_invalid_request(smollm2_hf_tokenizer):
    class NoTemplate:
        eos_token_id, bos_token_id, chat_template = 2, 1, None

        def __len__(self) -> int:
            return 10

    with pytest.raises(InvalidRequest, match="no chat template"):
        Tokenizer(NoTemplate()).apply_chat_template([{"role": "user", "content": "hi"}])


def _stream(tok, ids, **kwargs):
    detok = IncrementalDetokenizer(tok, **kwargs)
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.flush())
    return detok, deltas


@pytest.mark.parametrize("skip", [True, False])
def test_incremental_detokenizer_matches_full_decode(smollm2_tokenizer, skip):
    ids = smollm2_tokenizer.encode(MULTIBYTE + "<|im_end|>" + MULTIBYTE)
    assert any("\ufffd" in smollm2_tokenizer.decode([i]) for i in ids)  # the test needs split chars
    detok, deltas = _stream(smollm2_tokenizer, ids, skip_special_tokens=skip)
    assert "".join(deltas) == smollm2_tokenizer.decode(ids, skip_special_tokens=skip)
    assert not any("\ufffd" in d for d in deltas)
    assert deltas[-1] == ""  # everything complete was already streamed
    assert not detok.stopped and detok.stop_reason is None


def test_incremental_detokenizer_decodes_a_window_not_the_sequence(smollm2_tokenizer):
    seen: list[int] = []

    class Counting(Tokenizer):
        def decode(self, ids, skip_special_tokens=True):
            seen.append(len(ids))
            return super().decode(ids, skip_special_tokens)

    tok = Counting(smollm2_tokenizer.hf)
    ids = smollm2_tokenizer.encode(MULTIBYTE * 6)
    _, deltas = _stream(tok, ids)
    assert "".join(deltas) == smollm2_tokenizer.decode(ids)
    assert len(ids) > 100 and max(seen) <= 10  # two short windows, whatever the length


@pytest.mark.parametrize(
    ("stop", "reason"),
    [
        (("\nUser:",), "\nUser:"),
        (("😀",), "😀"),
        (("zzz", "東京"), "東京"),
        (("from 東", "Grüße 😀 from"), "Grüße 😀 from"),  # the earliest occurrence wins
    ],
)
def test_stop_strings_are_never_partly_emitted(smollm2_tokenizer, stop, reason):
    text = "Grüße 😀 from 東京!\nUse this.\nUser: never shown"
    ids = smollm2_tokenizer.encode(text)
    full = smollm2_tokenizer.decode(ids)
    expected = full[: full.index(reason)]
    detok = IncrementalDetokenizer(smollm2_tokenizer, stop=stop)
    emitted = ""
    for i in ids:
        emitted += detok.add(i)
        assert expected.startswith(emitted)  # never a character past the stop point
        if detok.stopped:
            break
    emitted += detok.flush()
    assert emitted == expected == detok.text
    assert detok.stopped and detok.stop_reason == reason
    assert detok.add(ids[0]) == "" and detok.flush() == ""


def test_stop_prefix_is_held_back_then_released(smollm2_tokenizer):
    ids = smollm2_tokenizer.encode("answer: 42\nUse")
    detok, deltas = _stream(smollm2_tokenizer, ids, stop=("\nUser:",))
    assert "".join(deltas[:-1]) == "answer: 42"  # "\nUse" could still become "\nUser:"
    assert deltas[-1] == "\nUse"
    assert not detok.stopped


def test_invalid_utf8_output_does_not_stall(smollm2_tokenizer):
    lone = next(i for i in smollm2_tokenizer.encode("😀") if smollm2_tokenizer.decode([i]) == "\ufffd")
    ids = [lone] * 12  # continuation bytes that never form a character
    detok, deltas = _stream(smollm2_tokenizer, ids)
    assert "".join(deltas[:-1])  # streamed before the end, not all held for flush()
    assert "".join(deltas) == smollm2_tokenizer.decode(ids)
