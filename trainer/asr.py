"""The speech LLM: frozen-encoder features → projector → audio embeds spliced into a decoder prompt.

Shape legend: B batch, T encoder frames, C encoder dim, T' projector frames, D decoder dim,
L decoder sequence length, N generated tokens.

A training sequence is `[bos] prefix <T'_i audio embeds> suffix transcript eos`, right padded; the
loss covers the transcript and eos only. A generation prompt is the same up to the suffix, left
padded, so every row's next token sits in the last column. The collator lays out token ids and, for
each audio slot, which projector frame fills it (`audio_pos`), so the model splices without any
host-device synchronisation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from trainer.decoder import PromptLayout

IGNORE = -100


@dataclass
class AsrBatch:
    """One collated batch. Tensors move to the device; the counts stay host-side Python numbers."""

    features: Tensor  # B, T, C float32
    feature_lengths: Tensor  # B
    input_ids: Tensor  # B, L (audio slots hold pad)
    audio_pos: Tensor  # B, L: projector frame index for audio slots, -1 elsewhere
    attention_mask: Tensor  # B, L
    labels: Tensor  # B, L: transcript + eos ids, IGNORE elsewhere
    index: Tensor  # B: dataset positions (eval gathers references by them)
    num_samples: int
    audio_seconds: float
    num_tokens: int  # non-pad decoder positions (prompt + audio + transcript)
    gen: dict[str, Tensor] = field(default_factory=dict)  # left-padded prompt: same keys, no labels
    texts: list[str] = field(default_factory=list)

    def to(self, device: torch.device) -> AsrBatch:
        def move(t: Tensor) -> Tensor:
            return t.to(device, non_blocking=True)

        return AsrBatch(
            features=move(self.features),
            feature_lengths=move(self.feature_lengths),
            input_ids=move(self.input_ids),
            audio_pos=move(self.audio_pos),
            attention_mask=move(self.attention_mask),
            labels=move(self.labels),
            index=move(self.index),
            num_samples=self.num_samples,
            audio_seconds=self.audio_seconds,
            num_tokens=self.num_tokens,
            gen={k: move(v) for k, v in self.gen.items()},
            texts=self.texts,
        )


class AsrCollator:
    """Items `{"features" [T, C], "text", "audio_seconds"}` (+ `"index"`) → `AsrBatch`."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        layout: PromptLayout,
        output_length: Callable[[Tensor], Tensor],
        *,
        generation_prompt: bool = False,
        time_mask: float = 0.0,
        time_mask_span: int = 1,
    ) -> None:
        self.tokenizer = tokenizer
        self.layout = layout
        self.output_length = output_length
        self.generation_prompt = generation_prompt
        self.time_mask, self.time_mask_span = time_mask, time_mask_span

    def _rows(self, audio_lengths: list[int], targets: list[list[int]] | None) -> dict[str, Tensor]:
        """`ids`, `pos` (audio slot → frame), `lab`, `mask`, each [B, L]: training rows when
        `targets` are given (right padded), generation prompts when None (left padded)."""
        lay = self.layout
        head = [lay.bos_id] if lay.bos_id is not None else []
        rows = []
        for i, n_audio in enumerate(audio_lengths):
            prompt = [*head, *lay.prefix_ids]
            ids = prompt + [lay.pad_id] * n_audio + list(lay.suffix_ids)
            pos = [-1] * len(prompt) + list(range(n_audio)) + [-1] * len(lay.suffix_ids)
            labels = [IGNORE] * len(ids)
            if targets is not None:
                target = [*targets[i], lay.eos_id]
                ids, pos, labels = ids + target, pos + [-1] * len(target), labels + target
            rows.append((ids, pos, labels))
        width = max(len(r[0]) for r in rows)
        left = targets is None  # generation prompts are left padded, training rows right padded
        out = {k: torch.empty(len(rows), width, dtype=torch.long) for k in ("ids", "pos", "lab")}
        out["mask"] = torch.zeros(len(rows), width, dtype=torch.long)
        for i, (ids, pos, labels) in enumerate(rows):
            pad = width - len(ids)
            span = slice(pad, width) if left else slice(0, len(ids))
            gap = slice(0, pad) if left else slice(len(ids), width)
            for key, values, filler in (
                ("ids", ids, lay.pad_id),
                ("pos", pos, -1),
                ("lab", labels, IGNORE),
            ):
                out[key][i, span] = torch.tensor(values)
                out[key][i, gap] = filler
            out["mask"][i, span] = 1
        return out

    def __call__(self, items: Sequence[dict[str, Any]]) -> AsrBatch:
        lengths = torch.tensor([it["features"].shape[0] for it in items])  # B
        frames = [it["features"].float() for it in items]
        if self.time_mask > 0:
            frames = [mask_time(f, self.time_mask, self.time_mask_span) for f in frames]
        feats = nn.utils.rnn.pad_sequence(frames, batch_first=True)  # B, T, C
        audio_lengths = self.output_length(lengths).tolist()
        texts = [it["text"] for it in items]
        targets = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        rows = self._rows(audio_lengths, targets)
        gen = {}
        if self.generation_prompt:
            g = self._rows(audio_lengths, None)
            gen = {"input_ids": g["ids"], "audio_pos": g["pos"], "attention_mask": g["mask"]}
        return AsrBatch(
            features=feats,
            feature_lengths=lengths,
            input_ids=rows["ids"],
            audio_pos=rows["pos"],
            attention_mask=rows["mask"],
            labels=rows["lab"],
            index=torch.tensor([it.get("index", -1) for it in items]),
            num_samples=len(items),
            audio_seconds=float(sum(it["audio_seconds"] for it in items)),
            num_tokens=int(rows["mask"].sum()),
            gen=gen,
            texts=texts,
        )


def mask_time(frames: Tensor, share: float, span: int) -> Tensor:
    """SpecAugment-style time masking: zero spans of `span` frames, about `share` of them in all.

    Draws from torch's global generator, whose state checkpoints save, so resumes stay exact.
    [T, C] -> [T, C]
    """
    t = frames.shape[0]
    starts = (torch.rand(t) < share / span).long()  # T: a masked span begins here
    begun = F.pad(starts.cumsum(0), (span, 0))  # span + T: spans begun up to each frame
    covered = (begun[span:] - begun[:-span]) > 0  # T: a span begun in the last `span` frames
    return frames.masked_fill(covered[:, None], 0.0)


@dataclass
class AsrOutput:
    loss: Tensor  # scalar: lm_loss + aux_loss (what is back-propagated)
    lm_loss: Tensor  # scalar: mean token cross-entropy over the batch's labels
    aux_loss: Tensor  # scalar: the projector's (weighted) auxiliary loss, 0 where none
    sample_loss_sum: Tensor  # B: summed token cross-entropy per sample
    sample_tokens: Tensor  # B: label tokens per sample
    stats: dict[str, Tensor]  # projector router statistics (detached)


class SpeechLM(nn.Module):
    """Projector + decoder. The encoder is not here: features come from the cache."""

    def __init__(
        self, projector: nn.Module, decoder: PreTrainedModel, layout: PromptLayout
    ) -> None:
        super().__init__()
        self.projector = projector
        self.decoder = decoder
        self.layout = layout

    def _embed(self, input_ids: Tensor, audio_pos: Tensor, audio: Tensor) -> Tensor:
        """Token embeddings with audio slots replaced by projector frames. → B, L, D"""
        tokens = self.decoder.get_input_embeddings()(input_ids)  # B, L, D
        b, t_out, d = audio.shape
        flat = audio.reshape(b * t_out, d).to(tokens.dtype)  # B*T', D
        rows = torch.arange(b, device=audio.device)[:, None] * t_out  # B, 1
        gathered = flat[(rows + audio_pos.clamp(min=0)).reshape(-1)].reshape(tokens.shape)
        return torch.where((audio_pos >= 0)[..., None], gathered, tokens)  # B, L, D

    def _project(self, features: Tensor, lengths: Tensor) -> Any:
        dtype = next(self.projector.parameters()).dtype
        return self.projector(features.to(dtype), lengths)

    def forward(self, batch: AsrBatch) -> AsrOutput:
        proj = self._project(batch.features, batch.feature_lengths)
        embeds = self._embed(batch.input_ids, batch.audio_pos, proj.embeds)  # B, L, D
        logits = self.decoder(inputs_embeds=embeds, attention_mask=batch.attention_mask).logits
        targets = batch.labels[:, 1:]  # B, L-1: position t predicts token t+1
        token_loss = F.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE, reduction="none"
        )  # B, L-1
        sample_tokens = (targets != IGNORE).sum(-1)  # B
        sample_loss_sum = token_loss.sum(-1)  # B
        lm_loss = sample_loss_sum.sum() / sample_tokens.sum().clamp(min=1)
        aux = proj.aux_loss.float()
        stats = {k: v.detach() for k, v in proj.stats.items()}
        return AsrOutput(lm_loss + aux, lm_loss, aux, sample_loss_sum, sample_tokens, stats)

    @torch.no_grad()
    def generate(self, batch: AsrBatch, max_new_tokens: int) -> Tensor:
        """Greedy decoding with a KV cache from the left-padded prompt. → B, N (pad after eos)."""
        lay, gen = self.layout, batch.gen
        proj = self._project(batch.features, batch.feature_lengths)
        embeds = self._embed(gen["input_ids"], gen["audio_pos"], proj.embeds)  # B, Lp, D
        mask = gen["attention_mask"]  # B, Lp
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: first real token at 0
        out = self.decoder(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
        )
        next_pos = positions[:, -1:] + 1  # B, 1
        done = torch.zeros(mask.shape[0], dtype=torch.bool, device=mask.device)
        steps: list[Tensor] = []
        for _ in range(max_new_tokens):
            token = out.logits[:, -1].argmax(-1)  # B
            token = torch.where(done, torch.full_like(token, lay.pad_id), token)
            steps.append(token)
            done |= token == lay.eos_id
            if bool(done.all()):  # one sync per generated token; eval only
                break
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            out = self.decoder(
                inputs_embeds=self.decoder.get_input_embeddings()(token[:, None]),
                attention_mask=mask,
                position_ids=next_pos,
                cache=out.cache,
                use_cache=True,
            )
            next_pos = next_pos + 1
        tokens = torch.stack(steps, dim=1)  # B, n
        return F.pad(tokens, (0, max_new_tokens - tokens.shape[1]), value=lay.pad_id)  # B, N


def strip_generated(tokens: Sequence[int], layout: PromptLayout) -> list[int]:
    """Generated ids up to (not including) the first eos."""
    out = []
    for t in tokens:
        if t == layout.eos_id:
            break
        out.append(t)
    return out
