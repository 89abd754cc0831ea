"""The decoder and its tokenizer: tiny (built) and pretrained (loaded by path)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from trainer.config import DecoderConfig, TinyDecoderConfig
from trainer.decoder import (
    BOS,
    DIGIT_WORDS,
    EOS,
    PAD,
    UNK,
    build_decoder,
    build_tiny_tokenizer,
    prompt_layout,
    save_decoder,
    tiny_vocabulary,
)

TINY = TinyDecoderConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)


def _tiny_cfg(**kw) -> DecoderConfig:
    return DecoderConfig(tiny=TINY, **kw)


def test_vocabulary_has_specials_digits_and_prompt_words() -> None:
    vocab = tiny_vocabulary(["Transcribe:", "nine, ten"])
    assert vocab[:4] == [PAD, BOS, EOS, UNK]
    assert set(DIGIT_WORDS) <= set(vocab)
    assert {"transcribe", ":", "ten", ","} <= set(vocab)
    assert len(vocab) == len(set(vocab))


def test_tiny_tokenizer_round_trip_and_unknown_words() -> None:
    tok = build_tiny_tokenizer(["say <audio> now"])
    ids = tok("Three oh FIVE", add_special_tokens=False)["input_ids"]
    assert len(ids) == 3 and tok.unk_token_id not in ids
    assert tok.decode(ids) == "three oh five"
    assert tok("banana", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == (PAD, BOS, EOS)


def test_tiny_decoder_is_seeded_and_frozen_unless_trainable() -> None:
    a, tok = build_decoder(_tiny_cfg())
    b, _ = build_decoder(_tiny_cfg())
    c, _ = build_decoder(DecoderConfig(tiny=TINY.model_copy(update={"seed": 1})))
    assert a.config.vocab_size == len(tok)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    assert not any(p.requires_grad for p in a.parameters())
    trained, _ = build_decoder(_tiny_cfg(trainable=True))
    assert all(p.requires_grad for p in trained.parameters())


def test_building_the_decoder_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    build_decoder(_tiny_cfg())
    assert torch.equal(torch.rand(3), expected)


def test_pretrained_decoder_loads_by_path(tmp_path) -> None:
    model, tok = build_decoder(_tiny_cfg(trainable=True))
    save_decoder(model, tok, tmp_path)
    loaded, loaded_tok = build_decoder(DecoderConfig(pretrained=str(tmp_path)))
    assert not any(p.requires_grad for p in loaded.parameters())
    ids = torch.tensor([tok("one two three")["input_ids"]])
    assert loaded_tok("one two three")["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, loaded(ids).logits)
    # The tokenizer alone also loads by path with the stock class.
    assert AutoTokenizer.from_pretrained(tmp_path).eos_token == EOS


def test_a_pickled_decoder_checkpoint_is_refused(tmp_path) -> None:
    """Weights load from safetensors only: a `pytorch_model.bin` (a pickle) is not read."""
    model, tok = build_decoder(_tiny_cfg(trainable=True))
    save_decoder(model, tok, tmp_path)
    weights = next(tmp_path.glob("*.safetensors"))
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    weights.unlink()
    with pytest.raises(OSError, match="safetensors"):
        build_decoder(DecoderConfig(pretrained=str(tmp_path)))


def test_prompt_layout_splits_at_the_placeholder() -> None:
    _, tok = build_decoder(_tiny_cfg(prompt="listen <audio> write digits"))
    layout = prompt_layout("listen <audio> write digits", tok)
    assert tok.decode(layout.prefix_ids) == "listen"
    assert tok.decode(layout.suffix_ids) == "write digits"
    assert (layout.bos_id, layout.eos_id, layout.pad_id) == (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )
    assert prompt_layout("<audio>", tok).prefix_ids == ()
