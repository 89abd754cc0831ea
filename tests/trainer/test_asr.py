"""The speech LLM: batch layout, audio splicing, transcript-only loss, batched greedy decoding."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from trial_toy import ENCODER_DIM, ToyFeatureSet

from projectors.base import ProjectorOutput
from trainer.asr import IGNORE, AsrCollator, SpeechLM, mask_time, strip_generated
from trainer.config import DecoderConfig, TinyDecoderConfig
from trainer.decoder import build_decoder, prompt_layout

PROMPT = "digits: <audio> text:"
K = 4


class StackProjector(nn.Module):
    """The projector interface at its smallest: stack K frames, one linear layer."""

    def __init__(self, dim: int, llm_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim * K, llm_dim)

    def output_length(self, t: Tensor) -> Tensor:
        return t // K

    def forward(self, x: Tensor, lengths: Tensor) -> ProjectorOutput:
        b, t, c = x.shape
        t_out = t // K
        y = self.linear(x[:, : t_out * K].reshape(b, t_out, K * c))  # B, T, C -> B, T', D
        return ProjectorOutput(y, self.output_length(lengths), x.new_zeros(()), {})


@pytest.fixture(scope="module")
def setup() -> tuple[SpeechLM, AsrCollator, ToyFeatureSet]:
    data = ToyFeatureSet(12, seed=0)
    tiny = TinyDecoderConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    cfg = DecoderConfig(tiny=tiny, trainable=True, prompt=PROMPT)
    decoder, tok = build_decoder(cfg, texts=[it["text"] for it in data.items])
    torch.manual_seed(0)
    model = SpeechLM(StackProjector(ENCODER_DIM, 32), decoder, prompt_layout(PROMPT, tok)).eval()
    return model, AsrCollator(tok, model.layout, model.projector.output_length), data


def test_training_rows_are_right_padded_with_loss_on_transcript_and_eos(setup) -> None:
    model, collate, data = setup
    batch = collate([data[i] for i in range(4)])
    lay = model.layout
    for i in range(4):
        n_audio = data.lengths[i] // K
        target = collate.tokenizer(data[i]["text"], add_special_tokens=False)["input_ids"]
        n = 1 + len(lay.prefix_ids) + n_audio + len(lay.suffix_ids) + len(target) + 1
        assert int(batch.attention_mask[i].sum()) == n
        assert batch.attention_mask[i, :n].all()  # right padding
        assert batch.audio_pos[i][batch.audio_pos[i] >= 0].tolist() == list(range(n_audio))
        labelled = batch.labels[i][batch.labels[i] != IGNORE].tolist()
        assert labelled == [*target, lay.eos_id]
        assert batch.input_ids[i, 0] == lay.bos_id
    assert batch.num_tokens == int(batch.attention_mask.sum())


def test_generation_prompts_are_left_padded_and_end_with_the_suffix(setup) -> None:
    model, collate, data = setup
    collate = AsrCollator(
        collate.tokenizer, model.layout, collate.output_length, generation_prompt=True
    )
    batch = collate([data[i] for i in range(4)])
    ids, mask = batch.gen["input_ids"], batch.gen["attention_mask"]
    suffix = list(model.layout.suffix_ids)
    for i in range(4):
        assert ids[i, -len(suffix) :].tolist() == suffix
        assert mask[i, -1] == 1 and mask[i].tolist() == sorted(mask[i].tolist())  # left padding


def test_audio_slots_hold_the_projector_frames(setup) -> None:
    model, collate, data = setup
    batch = collate([data[i] for i in range(3)])
    proj = model.projector(batch.features, batch.feature_lengths)
    embeds = model._embed(batch.input_ids, batch.audio_pos, proj.embeds)
    for i in range(3):
        slots = embeds[i][batch.audio_pos[i] >= 0]
        assert torch.equal(slots, proj.embeds[i, : slots.shape[0]])
    tokens = model.decoder.get_input_embeddings()(batch.input_ids)
    text = batch.audio_pos < 0
    assert torch.equal(embeds[text], tokens[text])


def test_loss_ignores_padding_and_batch_neighbours(setup) -> None:
    model, collate, data = setup
    with torch.no_grad():
        together = model(collate([data[i] for i in range(4)]))
        for i in range(4):
            alone = model(collate([data[i]]))
            assert torch.allclose(
                alone.sample_loss_sum, together.sample_loss_sum[i : i + 1], atol=1e-4
            )
            assert alone.sample_tokens.item() == together.sample_tokens[i].item()
    assert together.loss.isfinite() and together.loss.item() > 0


def test_batched_greedy_decoding_equals_one_by_one_and_hf_generate(setup) -> None:
    model, collate, data = setup
    collate = AsrCollator(
        collate.tokenizer, model.layout, collate.output_length, generation_prompt=True
    )
    items = [data[i] for i in range(6)]
    batched = model.generate(collate(items), max_new_tokens=5)
    assert batched.shape == (6, 5)
    for i, item in enumerate(items):
        single = collate([item])
        alone = model.generate(single, max_new_tokens=5)
        assert strip_generated(alone[0].tolist(), model.layout) == strip_generated(
            batched[i].tolist(), model.layout
        )
        # transformers' own greedy search from the same prompt embeddings agrees.
        proj = model.projector(single.features, single.feature_lengths)
        embeds = model._embed(single.gen["input_ids"], single.gen["audio_pos"], proj.embeds)
        hf = model.decoder.generate(
            inputs_embeds=embeds,
            attention_mask=single.gen["attention_mask"],
            max_new_tokens=5,
            do_sample=False,
            eos_token_id=model.layout.eos_id,
            pad_token_id=model.layout.pad_id,
        )
        assert strip_generated(hf[0].tolist(), model.layout) == strip_generated(
            alone[0].tolist(), model.layout
        )


def test_time_masking_zeroes_spans_of_about_the_share_asked() -> None:
    torch.manual_seed(0)
    frames = torch.ones(4000, 3)
    masked = mask_time(frames, 0.1, 5)
    zero = masked[:, 0] == 0
    assert 0.07 < zero.float().mean() < 0.13
    assert torch.equal(zero[:, None].expand_as(frames), masked == 0)  # whole frames
    runs, n = [], 0
    for z in zero.tolist():
        if z:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    assert runs and min(runs) >= 5  # whole spans (one cut short at the very end is not counted)
    torch.manual_seed(0)
    assert torch.equal(mask_time(frames, 0.1, 5), masked)  # seeded: resumes stay exact
