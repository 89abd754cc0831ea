"""The LLM half of the speech model: a causal LM and its tokenizer.

Two sources, one interface (`build_decoder`):

* tiny (`model.decoder.tiny`): a Llama-style `LlamaForCausalLM` built from a config, seeded, with a
  word-level tokenizer made with `tokenizers` (digit words incl. "oh", the prompt's words and the
  training transcripts' words, plus `<pad> <s> </s> <unk>`). No pretrained LLM exists offline, so
  the tiny preset trains this decoder from scratch.
* pretrained (`model.decoder.pretrained`): `AutoTokenizer` + `AutoModelForCausalLM.from_pretrained`
  from a hub id or a local `save_pretrained` directory.

The decoder is frozen (`requires_grad=False`) unless `decoder.trainable`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from trainer.config import AUDIO_PLACEHOLDER, DecoderConfig, TinyDecoderConfig

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
DIGIT_WORDS = ("zero", "oh", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TINY_MAX_POSITIONS = 2048
"""RoPE positions of the tiny decoder: prompt + audio frames + transcript (10 s, stride 1: 500)."""


@dataclass(frozen=True)
class PromptLayout:
    """Token ids around the audio: `[bos] prefix <audio frames> suffix transcript eos`."""

    prefix_ids: tuple[int, ...]
    suffix_ids: tuple[int, ...]
    bos_id: int | None
    eos_id: int
    pad_id: int


def _word_normalizer() -> normalizers.Normalizer:
    return normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])


def tiny_vocabulary(texts: Iterable[str]) -> list[str]:
    """Special tokens then every word (as the tiny tokenizer splits them) of `texts`, sorted."""
    norm, pre = _word_normalizer(), pre_tokenizers.Whitespace()
    words = set(DIGIT_WORDS)
    for text in texts:
        words.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(text)))
    return [PAD, BOS, EOS, UNK, *sorted(words - {PAD, BOS, EOS, UNK})]


def build_tiny_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `tiny_vocabulary(texts)`; lowercases, splits on spaces/punct."""
    vocab = {tok: i for i, tok in enumerate(tiny_vocabulary(texts))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer = _word_normalizer()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK
    )


def build_tiny_decoder(
    cfg: TinyDecoderConfig, tokenizer: PreTrainedTokenizerBase
) -> LlamaForCausalLM:
    """A randomly initialised Llama causal LM; weights depend only on `cfg` (incl. its seed)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=TINY_MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    # Fork the global RNG so building the decoder neither depends on nor disturbs the trial's seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return LlamaForCausalLM(config)


def load_pretrained_decoder(
    id_or_path: str, *, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """`AutoModelForCausalLM` + `AutoTokenizer` from a hub id or a `save_pretrained` directory."""
    tokenizer = AutoTokenizer.from_pretrained(id_or_path)
    if tokenizer.pad_token_id is None:
        # Many LLM tokenizers have no pad token; padded positions are masked, so eos serves.
        tokenizer.pad_token = tokenizer.eos_token
    # Weights from safetensors only: a `pytorch_model.bin` is a pickle, refused here.
    model = AutoModelForCausalLM.from_pretrained(id_or_path, dtype=dtype, use_safetensors=True)
    return model, tokenizer


def build_decoder(
    cfg: DecoderConfig, *, texts: Iterable[str] = (), dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The decoder and its tokenizer, frozen unless `cfg.trainable`.

    `texts` (training transcripts) feed the tiny tokenizer's vocabulary; a pretrained decoder
    ignores them. `dtype` applies to pretrained weights only (e.g. bf16 for a frozen LLM on GPU).
    """
    if cfg.tiny is not None:
        prompt_words = cfg.prompt.split(AUDIO_PLACEHOLDER)
        tokenizer = build_tiny_tokenizer([*prompt_words, *texts])
        model: PreTrainedModel = build_tiny_decoder(cfg.tiny, tokenizer)
    else:
        assert cfg.pretrained is not None  # the config validator guarantees one source
        model, tokenizer = load_pretrained_decoder(cfg.pretrained, dtype=dtype)
    model.requires_grad_(cfg.trainable)
    return model, tokenizer


def prompt_layout(prompt: str, tokenizer: PreTrainedTokenizerBase) -> PromptLayout:
    """Split `prompt` at `<audio>` and tokenise each side without special tokens."""
    before, after = prompt.split(AUDIO_PLACEHOLDER)

    def ids(text: str) -> tuple[int, ...]:
        return tuple(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else ()

    if tokenizer.eos_token_id is None:
        raise ValueError("the decoder's tokenizer has no eos token: transcripts could not end")
    return PromptLayout(
        prefix_ids=ids(before),
        suffix_ids=ids(after),
        bos_id=tokenizer.bos_token_id,
        eos_id=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id,
    )


def save_decoder(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path) -> None:
    """`save_pretrained` of both, so `load_pretrained_decoder(path)` gives them back."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
