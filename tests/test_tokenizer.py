"""Tokenizers against transformers: HF tokenizer.json folders and a SentencePiece (llama) GGUF vocabulary."""
import pytest
from tiny_models import tiny_models  # noqa: F401  (pytest fixture)

from flashgen.engine.gguf import GGUFFile
from flashgen.engine.tokenizer import gguf_tokenizer, load_hf_tokenizer

gguf = pytest.importorskip("gguf")
TEXTS = ["hello world", " hello  world!", "the cat in the hat", "héllo, wörld.\n\n\tx", "<s>hello</s> the", "",
         "<|im_start|>user\nhi 😀<|im_end|>", "東京 naïve   spaces  "]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]


def test_hf_tokenizer_matches_transformers(tiny_models):  # noqa: F811
    from transformers import AutoTokenizer

    path = tiny_models["llama"]
    ours, theirs = load_hf_tokenizer(path), AutoTokenizer.from_pretrained(path)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs.encode(text), repr(text)
        assert ours.encode(text, add_special_tokens=False) == theirs.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == theirs.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
    for gen in (True, False):
        assert ours.apply_chat_template(MESSAGES, add_generation_prompt=gen) == theirs.apply_chat_template(
            MESSAGES, tokenize=False, add_generation_prompt=gen)
    assert ours.bos_token_id == theirs.bos_token_id and theirs.eos_token_id in ours.eos_token_ids
    assert ours.vocab_size == len(theirs)


def write_sentencepiece_gguf(path):
    """A llama-style vocabulary: <unk>, <s>, </s>, 256 byte tokens, then pieces scored by merge rank."""
    pieces = ["▁", "e", "t", "a", "o", "h", "l", "w", "r", "d", "n", "s", "i", "c", "▁t", "he", "▁the", "▁a", "ll",
              "▁w", "or", "ld", "▁wor", "▁world", "▁h", "▁he", "llo", "▁hello", "in", "▁in", "er", "an", "▁c", "at",
              "▁cat", "é", "!", ",", "."]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(pieces))])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(pieces))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_sentencepiece_gguf_matches_transformers(tmp_path):
    from transformers import AutoTokenizer

    write_sentencepiece_gguf(str(tmp_path / "sp.gguf"))
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="sp.gguf")
    ours = gguf_tokenizer(GGUFFile(str(tmp_path / "sp.gguf")).meta)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs.encode(text), repr(text)
        assert ours.decode(ids) == theirs.decode(ids), repr(text)
    assert ours.encode("hello")[0] == ours.bos_token_id == 1 and ours.eos_token_ids == {2}


def test_no_chat_template(tmp_path):
    write_sentencepiece_gguf(str(tmp_path / "sp.gguf"))
    ours = gguf_tokenizer(GGUFFile(str(tmp_path / "sp.gguf")).meta)
    with pytest.raises(ValueError, match="no chat template"):
        ours.apply_chat_template(MESSAGES)
