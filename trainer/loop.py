"""One trial: `train_trial(cfg, report, workdir=…)` trains a projector (and maybe the decoder).

The loop (`_train`) is one flat function: build → `accelerator.prepare` → `accumulate` → periodic
evaluate → report. Around it: the Accelerator factory, a length-grouped batch stream, and a window
that sums training metrics on the device so the hot path never waits for the host (values are read
once per log point). Metrics go to a `Reporter`; the caller decides where (a list, stdout, Tune).
`sys/peak_mem_mb` is the process's peak: on the CPU the resident-set high-water mark, which in a
long-lived worker also covers earlier trials.
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed
from accelerate.utils.imports import get_torch_accelerator_backend
from torch.utils.data import DataLoader, Dataset, Sampler
from transformers import PreTrainedTokenizerBase, get_cosine_schedule_with_warmup

from projectors import build_projector
from trainer.asr import AsrBatch, AsrCollator, AsrOutput, SpeechLM
from trainer.checkpoint import TrainerState, load_checkpoint, save_checkpoint, save_projector
from trainer.config import TrainConfig, TrialConfig
from trainer.decoder import build_decoder, prompt_layout, save_decoder
from trainer.evaluation import evaluate
from trainer.features import FeatureSet, load_features

Status = Literal["completed", "diverged", "failed"]


class Reporter(Protocol):
    def __call__(
        self, metrics: dict[str, float], step: int, checkpoint: Path | None = None
    ) -> None: ...


@dataclass
class TrialResult:
    status: Status
    final: dict[str, float]  # last value of every key logged
    history: list[dict[str, float]]  # every logged point, {"step": n, key: value, …}
    message: str = ""


def train_trial(
    cfg: TrialConfig, report: Reporter, *, workdir: Path, resume_from: Path | None = None
) -> TrialResult:
    """Train one trial config; call `report` at log and eval points (main process only)."""
    threads = torch.get_num_threads()
    try:
        return _train(cfg, report, Path(workdir), resume_from)
    finally:
        torch.set_num_threads(threads)  # `train.cpu_threads` must not outlive the trial


def _train(
    cfg: TrialConfig, report: Reporter, workdir: Path, resume_from: Path | None
) -> TrialResult:
    tc = cfg.train
    accelerator = make_accelerator(tc, sparse=cfg.model.projector.type == "moe")
    set_seed(tc.seed)
    with accelerator.main_process_first():  # the feature cache is built once, by rank 0 first
        splits = load_features(cfg)  # on all of torch's threads: caching is a one-off
    if accelerator.device.type == "cpu" and tc.cpu_threads is not None:
        torch.set_num_threads(tc.cpu_threads)
    model, tokenizer = build_model(cfg, splits.train, splits.encoder_dim, tc.precision)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        param_groups(model, tc), lr=tc.lr, betas=tc.adam_betas, weight_decay=tc.weight_decay
    )
    scheduler = get_cosine_schedule_with_warmup(optimizer, tc.warmup_steps, tc.max_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    core: SpeechLM = accelerator.unwrap_model(model)
    state, trains_decoder = TrainerState(), cfg.model.decoder.trainable
    ckpt_parts = {"model": core, "optimizer": optimizer, "scheduler": scheduler}
    if resume_from is not None:
        state = load_checkpoint(
            Path(resume_from), accelerator, **ckpt_parts, decoder_trainable=trains_decoder
        )
    collate = AsrCollator(tokenizer, core.layout, core.projector.output_length)
    train_loader = train_data(splits.train, tc, collate, accelerator, start_step=state.step)
    eval_loader, references = eval_data(splits.eval, tc.eval_batch_size, collate, accelerator)
    static = {"model/projector_params": float(sum(p.numel() for p in core.projector.parameters()))}
    window = Window(accelerator)
    status, message = "completed", ""
    model.train()
    for batch in train_loader:
        if state.step >= tc.max_steps or status != "completed":
            break
        batch = batch.to(accelerator.device)
        with accelerator.accumulate(model):
            out: AsrOutput = model(batch)
            accelerator.backward(out.loss)
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(trainable, tc.max_grad_norm or math.inf)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        window.add_micro(out, batch)
        if not accelerator.sync_gradients:
            continue
        window.add_step(grad_norm, scheduler.get_last_lr()[0])
        if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: keep the schedule in step
            scheduler.step()
        state.step += 1
        eval_now = state.step % tc.eval_every == 0 or state.step == tc.max_steps
        if not eval_now and state.step % tc.log_every:
            continue
        metrics = window.flush() | static | {"sys/peak_mem_mb": peak_memory_mb()}
        checkpoint, evaluation = None, None
        if not math.isfinite(metrics["train/loss"]):
            status, message = "diverged", divergence_message(metrics["train/loss"], state.step, tc)
        elif eval_now:
            evaluation = evaluate(
                core,
                eval_loader,
                accelerator,
                references=references,
                decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
                max_new_tokens=tc.max_new_tokens,
            )
            metrics |= evaluation.metrics
        state.history.append({"step": state.step, **metrics})
        if eval_now and status == "completed":
            checkpoint = save_checkpoint(
                accelerator,
                workdir,
                **ckpt_parts,
                tokenizer=tokenizer,
                state=state,
                decoder_trainable=trains_decoder,
                transcripts=evaluation.transcripts_tsv() if evaluation else None,
            )
        if accelerator.is_main_process:
            report(metrics, state.step, checkpoint)
        window.restart_clock()  # eval and checkpoint time is not training throughput
    if accelerator.is_main_process:
        save_projector(core, workdir / "projector.safetensors")
        if trains_decoder:
            save_decoder(core.decoder, tokenizer, workdir / "decoder")
    accelerator.wait_for_everyone()
    return TrialResult(status, final_metrics(state.history), state.history, message)


def param_groups(model: SpeechLM, tc: TrainConfig) -> list[dict]:
    """AdamW's groups: the projector at `lr`, a trained decoder at `decoder_lr` (default `lr`).

    The projector comes first, so `scheduler.get_last_lr()[0]` is its (reported) rate; the
    schedule scales every group alike.
    """
    projector = [p for p in model.projector.parameters() if p.requires_grad]
    decoder = [p for p in model.decoder.parameters() if p.requires_grad]
    groups = [{"params": projector, "lr": tc.lr}]
    if decoder:
        groups.append({"params": decoder, "lr": tc.decoder_lr or tc.lr})
    return groups


def make_accelerator(tc: TrainConfig, *, sparse: bool = False) -> Accelerator:
    """The process's Accelerator for this trial; precision is decided here, once.

    Accelerate keeps process-wide singletons, and a second `Accelerator` with another precision
    raises. Tune runs many trials in one worker process, so the per-trial parts are reset first;
    the process group (`PartialState`) is kept. `sparse`: the model has parameters that some
    steps do not use (a sparse MoE projector).
    """
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    return Accelerator(
        cpu=cpu_only(),
        mixed_precision=tc.precision,
        gradient_accumulation_steps=tc.grad_accum,
        # A sparse MoE expert may get no tokens in a step: DDP must not wait for its gradients
        # (`sparse`). Elsewhere every parameter is used, and the search would only cost time.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=sparse)],
    )


def cpu_only() -> bool:
    """True on a machine with no accelerator at all.

    Telling Accelerate so is what makes a multi-process launch (`accelerate launch --multi_gpu
    --num_processes 2` sets RANK/WORLD_SIZE) run as MULTI_CPU over gloo instead of as N unrelated
    single processes; Accelerate's own `--cpu` flag starts a single process unless MPI is used.
    """
    return get_torch_accelerator_backend()[0] is None


def build_model(
    cfg: TrialConfig, train_set: FeatureSet, encoder_dim: int, precision: str
) -> tuple[SpeechLM, PreTrainedTokenizerBase]:
    """Decoder + tokenizer, projector and prompt layout, as a `SpeechLM` (on the CPU)."""
    dec_cfg = cfg.model.decoder
    texts = train_set.texts if dec_cfg.tiny else []
    # A frozen pretrained LLM may sit in bf16 under bf16 autocast; trained weights stay fp32.
    dtype = torch.bfloat16 if precision == "bf16" and not dec_cfg.trainable else torch.float32
    decoder, tokenizer = build_decoder(dec_cfg, texts=texts, dtype=dtype)
    projector = build_projector(
        cfg.model.projector, encoder_dim=encoder_dim, llm_dim=decoder.config.hidden_size
    )
    return SpeechLM(projector, decoder, prompt_layout(dec_cfg.prompt, tokenizer)), tokenizer


class LengthGroupedBatches(Sampler[list[int]]):
    """An endless stream of batches of similar length, in an order fixed by (seed, position).

    Each epoch shuffles the items, sorts groups of `group_batches` batches by length, cuts them into
    batches and shuffles the batches, so padding stays small while order stays random. Global
    batch `g` goes to rank `g % world`; `start` (micro-batches per rank) skips what a resumed run
    has already seen without replaying it.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        seed: int,
        start: int = 0,
        rank: int = 0,
        world: int = 1,
        group_batches: int = 32,
    ) -> None:
        self.lengths = [int(n) for n in lengths]
        self.batch_size = min(batch_size, len(self.lengths))
        self.seed, self.start, self.rank, self.world = seed, start, rank, world
        self.group = group_batches * self.batch_size

    def epoch(self, e: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + e)
        n_used = len(self.lengths) // self.batch_size * self.batch_size  # drop a ragged tail
        order = torch.randperm(len(self.lengths), generator=g)[:n_used].tolist()
        batches = []
        for lo in range(0, n_used, self.group):
            group = sorted(order[lo : lo + self.group], key=self.lengths.__getitem__)
            batches += [
                group[i : i + self.batch_size] for i in range(0, len(group), self.batch_size)
            ]
        return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]

    def __iter__(self) -> Iterator[list[int]]:
        per_epoch = len(self.lengths) // self.batch_size
        g = self.start * self.world + self.rank
        cached_epoch, batches = -1, []
        while True:
            e = g // per_epoch
            if e != cached_epoch:
                cached_epoch, batches = e, self.epoch(e)
            yield batches[g % per_epoch]
            g += self.world


def train_data(
    train_set: FeatureSet,
    tc: TrainConfig,
    collate: AsrCollator,
    accelerator: Accelerator,
    *,
    start_step: int,
) -> DataLoader:
    """This process's endless, length-grouped (and maybe time-masked) training batches, from
    optimizer step `start_step`."""
    augmented = AsrCollator(
        collate.tokenizer,
        collate.layout,
        collate.output_length,
        time_mask=tc.time_mask,
        time_mask_span=tc.time_mask_span,
    )
    batches = LengthGroupedBatches(
        train_set.lengths,
        tc.batch_size,
        seed=tc.seed,
        start=start_step * tc.grad_accum,
        rank=accelerator.process_index,
        world=accelerator.num_processes,
    )
    # Its own generator: creating the iterator draws a worker seed, which from the global RNG
    # would shift a resumed run's time masks by one draw.
    seeded = torch.Generator().manual_seed(tc.seed)
    return DataLoader(train_set, batch_sampler=batches, collate_fn=augmented, generator=seeded)


def divergence_message(loss: float, step: int, tc: TrainConfig) -> str:
    return (
        f"training loss is {loss} at step {step}: the trial diverged "
        f"(lr {tc.lr:g}; try a lower train.lr or train.max_grad_norm)"
    )


class _Indexed(Dataset):
    """Adds `"index"` to every item, so gathered eval results map back to their references."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        return {**self.base[i], "index": i}


def eval_data(
    eval_set: FeatureSet, batch_size: int, collate: AsrCollator, accelerator: Accelerator
) -> tuple[DataLoader, list[str]]:
    """This process's eval loader (length-sorted batches, every `world`-th one) and the texts."""
    lengths = [int(n) for n in eval_set.lengths]
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    mine = batches[accelerator.process_index :: accelerator.num_processes]
    gen_collate = AsrCollator(
        collate.tokenizer, collate.layout, collate.output_length, generation_prompt=True
    )
    loader = DataLoader(_Indexed(eval_set), batch_sampler=mine, collate_fn=gen_collate)
    return loader, list(eval_set.texts)


class Window:
    """Training metrics summed on the device between log points; read (one sync) by `flush`."""

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator
        self._reset()
        self.restart_clock()

    def _reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.micro = self.steps = self.samples = self.tokens = 0
        self.audio_s = 0.0

    def restart_clock(self) -> None:
        self.clock = time.perf_counter()

    def _add(self, key: str, value: torch.Tensor) -> None:
        value = value.detach().float()
        self.sums[key] = self.sums[key] + value if key in self.sums else value

    def add_micro(self, out: AsrOutput, batch: AsrBatch) -> None:
        self.micro += 1
        self.samples += batch.num_samples
        self.tokens += batch.num_tokens
        self.audio_s += batch.audio_seconds
        for key, value in (
            ("train/loss", out.loss),
            ("train/lm_loss", out.lm_loss),
            ("train/aux_loss", out.aux_loss),
        ):
            self._add(key, value)
        for key, value in out.stats.items():
            name = key if key.startswith("router/") else f"train/{key}"
            self._add(name, value.mean())

    def add_step(self, grad_norm: torch.Tensor, lr: float) -> None:
        self.steps += 1
        self._add("train/grad_norm", torch.as_tensor(grad_norm))
        self.lr = lr

    def flush(self) -> dict[str, float]:
        """Window means (averaged over processes) and throughput; starts a new window."""
        keys = sorted(self.sums)
        divisors = [self.steps if k == "train/grad_norm" else self.micro for k in keys]
        vec = torch.stack([self.sums[k] / d for k, d in zip(keys, divisors, strict=True)])
        vec = self.accelerator.reduce(vec, reduction="mean")
        metrics = dict(zip(keys, vec.tolist(), strict=True))  # the one host sync per window
        elapsed = max(time.perf_counter() - self.clock, 1e-9)
        world = self.accelerator.num_processes  # every process runs batches of the same size
        metrics |= {
            "train/lr": float(self.lr),
            "train/samples_per_s": self.samples * world / elapsed,
            "train/audio_s_per_s": self.audio_s * world / elapsed,
            "train/tokens_per_s": self.tokens * world / elapsed,
        }
        self._reset()
        self.restart_clock()
        return metrics


def peak_memory_mb() -> float:
    """Peak CUDA memory allocated, or on CPU the process's peak resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def final_metrics(history: list[dict[str, float]]) -> dict[str, float]:
    """The last value of every key in `history` (without `step`)."""
    final: dict[str, float] = {}
    for point in history:
        final |= {k: v for k, v in point.items() if k != "step"}
    return final
