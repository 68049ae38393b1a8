"""Incremental detokenization and stop strings, on real `tokenizers` tokenizers (byte-level and SentencePiece)."""
import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from flashgen.engine.stream import StopStrings, TextStream

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello world! How are you today?",
    "東京は日本の首都です。café naïve façade — “quotes” and emoji 😀🎉👍🏽 and more",
    "def main():\n    print('hello')\n    return 0\n",
]
TEXTS = [
    "Hello world! 😀 東京 café 👍🏽",
    "  leading spaces and\ttabs\nnew lines  ",
    "🎉🎉🎉東京東京 naïve",
]


def _train(kind):
    tok = Tokenizer(models.BPE())
    if kind == "bytelevel":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:  # SentencePiece-style: "▁" for spaces, the decoder strips the leading one
        tok = Tokenizer(models.BPE(byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
        alphabet = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"], initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    if kind != "bytelevel":
        tok.add_tokens([f"<0x{b:02X}>" for b in range(256)])
    return tok


@pytest.fixture(scope="module", params=["bytelevel", "sentencepiece"])
def tokenizer(request):
    return _train(request.param)


def _stream(tokenizer, ids, stop=()):
    s = TextStream(tokenizer, stop)
    pieces = []
    for t in ids:
        pieces.append(s.add(t))
        if s.stopped:
            break
    pieces.append(s.finish())
    assert "".join(pieces) == s.text
    return pieces


@pytest.mark.parametrize("text", TEXTS)
def test_stream_equals_decode_and_never_splits_a_character(tokenizer, text):
    ids = tokenizer.encode(text).ids
    pieces = _stream(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids)
    assert all("\ufffd" not in p for p in pieces)


def test_random_ids_stream_equals_decode(tokenizer):
    # Byte-fallback tokens are left out: a run of them that is not valid UTF-8 decodes to one U+FFFD per
    # token only once the whole run is known, which no stream can foresee (byte-level BPE has no such case).
    rng = random.Random(0)
    vocab = [i for t, i in tokenizer.get_vocab().items() if not t.startswith("<0x")]
    for _ in range(50):
        ids = [rng.choice(vocab) for _ in range(rng.randrange(1, 30))]
        assert "".join(_stream(tokenizer, ids)) == tokenizer.decode(ids)


def test_multibyte_characters_split_over_tokens_come_out_whole():
    tok = _train("sentencepiece")
    text = "a😀b東京👍🏽"
    vocab = tok.get_vocab()
    ids = [vocab[f"<0x{b:02X}>"] for b in text.encode()]
    pieces = [p for p in _stream(tok, ids) if p]
    assert "".join(pieces) == text == tok.decode(ids)
    assert pieces == ["a", "😀", "b", "東", "京", "👍", "🏽"]


@pytest.mark.parametrize("stop", [["o wor"], ["xyz", "😀 東"], ["!"], ["café 👍"]])
def test_stop_string_across_tokens_is_cut_and_never_leaks(tokenizer, stop):
    text = TEXTS[0]
    ids = tokenizer.encode(text).ids
    cut = min(text.find(s) for s in stop if s in text)
    s = TextStream(tokenizer, stop)
    emitted = ""
    for t in ids:
        emitted += s.add(t)
        assert text[:cut].startswith(emitted), f"emitted {emitted!r} past the stop string"
        if s.stopped:
            break
    emitted += s.finish()
    assert s.stopped and emitted == s.text == text[:cut]


def test_stop_strings_on_any_chunking():
    rng = random.Random(1)
    text = "abcabdab abcd ab"
    for stop in (["abd"], ["cd", "b a"], ["abcd"], ["zz"], ["d ab", "a"]):
        hits = [text.find(s) for s in stop if s in text]
        want = text[:min(hits)] if hits else text
        for _ in range(30):
            cuts = sorted(rng.sample(range(1, len(text)), rng.randrange(0, 8)))
            chunks = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
            ss = StopStrings(stop)
            out = ""
            for c in chunks:
                out += ss.feed(c)
                assert want.startswith(out)
            out += ss.flush()
            assert out == want, (stop, chunks)
            assert ss.stopped == bool(hits)


def test_text_after_a_partial_stop_match_is_released_at_the_end(tokenizer):
    text = "Hello wor"
    ids = tokenizer.encode(text).ids
    assert "".join(_stream(tokenizer, ids, ["world"])) == text
