"""Trial checkpoints: everything an exact resume needs, in one directory per optimizer step.

Layout of `<workdir>/checkpoints/step_<n>/`:

* `projector.safetensors` — the projector's weights;
* `decoder.safetensors` — the decoder's weights, only when it is trained;
* `tokenizer/` — the decoder's tokenizer (`save_pretrained`; loads by path);
* `optimizer.pt`, `scheduler.pt` — AdamW and LR-schedule state;
* `rng_state_<rank>.pt` — Python, NumPy and torch (CPU + CUDA) generators of every process;
* `trainer_state.json` — the step and the history of reported metrics;
* `transcripts.tsv` — this evaluation's `reference`, `hypothesis` and per-utterance `wer`
  (tab-separated, eval-set order; WER after the same normaliser as `eval/wer`).

The data order needs no state of its own: it is a function of (seed, position in the stream), and
the position follows from the step. A checkpoint is written into `step_<n>.tmp` and renamed, so a
directory named `step_<n>` is always complete; older ones are then deleted.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn
from transformers import PreTrainedTokenizerBase

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
TRANSCRIPTS_FILE = "transcripts.tsv"


@dataclass
class TrainerState:
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def checkpoint_dir(workdir: Path, step: int) -> Path:
    return workdir / CHECKPOINTS / f"step_{step}"


def latest_checkpoint(workdir: Path) -> Path | None:
    """The complete checkpoint with the highest step under `workdir`, or None."""
    root = workdir / CHECKPOINTS
    if not root.is_dir():
        return None
    steps = [
        int(p.name.removeprefix("step_"))
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith("step_") and p.name.removeprefix("step_").isdigit()
    ]
    return checkpoint_dir(workdir, max(steps)) if steps else None


def _rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        # Plain types and tensors only, so that it loads with `weights_only=True` (no pickle).
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    accelerator: Accelerator,
    workdir: Path,
    *,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainerState,
    decoder_trainable: bool,
    transcripts: str | None = None,
) -> Path:
    """Write the checkpoint for `state.step` (every process takes part) and return its path.

    `model` is the unwrapped `SpeechLM`.
    """
    final = checkpoint_dir(workdir, state.step)
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(_cpu_state(model.projector), tmp / "projector.safetensors")
        if decoder_trainable:
            save_model(model.decoder, str(tmp / "decoder.safetensors"))
        tokenizer.save_pretrained(tmp / "tokenizer")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / STATE_FILE).write_text(json.dumps({"step": state.step, "history": state.history}))
        if transcripts is not None:
            (tmp / TRANSCRIPTS_FILE).write_text(transcripts, encoding="utf-8")
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), tmp / f"rng_state_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in final.parent.iterdir():
            if old != final and old.name.startswith("step_"):
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(
    path: Path,
    accelerator: Accelerator,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    decoder_trainable: bool,
) -> TrainerState:
    """Restore weights, optimiser, scheduler and this process's RNG from `path`; return state."""
    model.projector.load_state_dict(load_file(path / "projector.safetensors"))
    if decoder_trainable:
        load_model(model.decoder, str(path / "decoder.safetensors"))
    device = accelerator.device
    optimizer.load_state_dict(
        torch.load(path / "optimizer.pt", map_location=device, weights_only=True)
    )
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = path / f"rng_state_{accelerator.process_index}.pt"
    if not rng.exists():  # resumed with more processes than saved: reuse rank 0's generators
        rng = path / "rng_state_0.pt"
    _set_rng_state(torch.load(rng, weights_only=True))
    saved = json.loads((path / STATE_FILE).read_text())
    return TrainerState(step=int(saved["step"]), history=list(saved["history"]))


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}


def save_projector(model: nn.Module, path: Path) -> None:
    """The projector's weights as one safetensors file (`projector.safetensors`)."""
    save_file(_cpu_state(model.projector), path)
