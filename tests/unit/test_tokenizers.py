import pytest

from genlab.core.errors import DataError
from genlab.data.tokenizers import (
    BPETokenizer,
    CharTokenizer,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)

ODD = "Caf\u00e9 na\u00efve \u2014 \u65e5\u672c\u8a9e \U0001f600 tabs\tand\r\nCRLF \x00 nul \U00010348"


def test_char_round_trip_and_unknown_characters(tmp_path):
    tok = CharTokenizer.train("hello world\n")
    assert tok.decode(tok.encode("hello\nworld")) == "hello\nworld"
    assert list(tok.encode_array("low")) == tok.encode("low")
    with pytest.raises(DataError, match=r"cannot encode 2 character\(s\).*'!', 'z'"):
        tok.encode("hello z!")
    save_tokenizer(tok, tmp_path / "tokenizer.json")
    again = load_tokenizer(tmp_path / "tokenizer.json")
    assert again.kind == "char" and again.encode("hello") == tok.encode("hello")


def test_bpe_round_trips_any_utf8(tmp_path):
    corpus = "To be, or not to be, that is the question:\n" * 50 + "Whether 'tis nobler in the mind to suffer\n" * 50
    tok = train_tokenizer("bpe", corpus, vocab_size=300)
    assert isinstance(tok, BPETokenizer) and tok.vocab_size <= 300
    for text in [corpus[:200], ODD, "", " leading and trailing spaces  ", "\n\n\n"]:
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("To be, or not to be")) < len("To be, or not to be")  # merges were learned
    save_tokenizer(tok, tmp_path / "tokenizer.json")
    again = load_tokenizer(tmp_path / "tokenizer.json")
    assert again.encode(ODD) == tok.encode(ODD)
    for text in (corpus[:500], ODD, "a\n  b\n\n c\nd  \n\te"):
        assert list(tok.encode_array(text)) == tok.encode(text)


def test_bpe_vocab_size_is_checked():
    from genlab.core.errors import ConfigError

    with pytest.raises(ConfigError, match="vocab_size"):
        train_tokenizer("bpe", "abc", vocab_size=10)
