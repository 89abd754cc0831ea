"""`projsweep train CONFIG.yaml [--set k=v]… [--out DIR] [--resume]`: one trial, no Ray.

Writes `DIR/config.yaml` (the resolved config, runnable as-is), `DIR/metrics.json`
(`{"status", "final", "history"}`; non-finite numbers are written as `null` so the file is strict
JSON) and `DIR/projector.safetensors`; checkpoints go to `DIR/checkpoints/`. Prints a line per log
point and per evaluation. Exit 0 when the trial completed, 1 when it diverged or failed; a bad
config raises `ConfigError` before anything starts (the CLI exits 2).
"""

from __future__ import annotations

import argparse
import json
import math
import time
import traceback
from pathlib import Path
from typing import Any

import yaml
from accelerate import PartialState

from trainer.checkpoint import STATE_FILE, latest_checkpoint
from trainer.config import TrialConfig, dump_trial_config, load_trial_config
from trainer.loop import TrialResult, cpu_only, final_metrics, train_trial
from trainer.overrides import ConfigError


class ProgressPrinter:
    """A `Reporter` that prints progress and keeps the history (for a failed run's metrics.json)."""

    def __init__(self, cfg: TrialConfig, history: list[dict[str, Any]], num_processes: int) -> None:
        self.max_steps = cfg.train.max_steps
        # samples/s counts every process; one optimizer step takes this many samples.
        self.samples_per_step = cfg.train.batch_size * cfg.train.grad_accum * num_processes
        self.history = list(history)
        self.start = time.perf_counter()

    def __call__(
        self, metrics: dict[str, float], step: int, checkpoint: Path | None = None
    ) -> None:
        self.history.append({"step": step, **metrics})
        elapsed = time.perf_counter() - self.start  # since the command started, data included
        head = f"[{elapsed:6.1f} s] step {step:>{len(str(self.max_steps))}}/{self.max_steps}"
        if "train/loss" in metrics:
            steps_per_s = metrics["train/samples_per_s"] / self.samples_per_step
            print(
                f"{head}  loss {metrics['train/loss']:.4f}  lr {metrics['train/lr']:.2e}  "
                f"{steps_per_s:.1f} steps/s  {metrics['train/audio_s_per_s']:.0f} audio-s/s",
                flush=True,
            )
        if "eval/wer" in metrics:
            print(
                f"{head}  eval loss {metrics['eval/loss']:.4f}  WER {metrics['eval/wer']:.4f}  "
                f"CER {metrics['eval/cer']:.4f}",
                flush=True,
            )


def train_command(args: argparse.Namespace) -> int:
    cfg = load_trial_config(args.config, args.overrides)
    out = (
        Path(args.out)
        if args.out
        else Path("projsweep-runs", "train", time.strftime("%Y%m%d-%H%M%S"))
    )
    resume_from, history = _resume_point(out, cfg) if args.resume else (None, [])
    state = PartialState(cpu=cpu_only())  # the process group, shared with the trial's Accelerator
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_trial_config(cfg), encoding="utf-8")
        print(
            f"projsweep train: writing to {out}"
            + (f", resuming {resume_from}" if resume_from else "")
        )
    printer = ProgressPrinter(cfg, history, state.num_processes)
    started = time.perf_counter()
    try:
        result = train_trial(cfg, printer, workdir=out, resume_from=resume_from)
    except ConfigError:
        raise
    except Exception as exc:  # a run-time failure: keep what was logged, then exit 1
        traceback.print_exc()
        history = printer.history
        result = TrialResult(
            "failed", final_metrics(history), history, f"{type(exc).__name__}: {exc}"
        )
    if state.is_main_process:
        write_metrics(out / "metrics.json", result)
        _print_summary(result, time.perf_counter() - started, out)
    return 0 if result.status == "completed" else 1


def _resume_point(out: Path, cfg: TrialConfig) -> tuple[Path | None, list[dict[str, Any]]]:
    """OUT's last checkpoint and its history; the config must be the one OUT was started with."""
    saved = out / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"--resume: {saved} not found (pass the --out of the run to continue)")
    before = TrialConfig.model_validate(yaml.safe_load(saved.read_text(encoding="utf-8")))
    if before != cfg:
        diff = _differences(before.model_dump(mode="json"), cfg.model_dump(mode="json"))
        raise ConfigError([f"{p}: differs from {saved}" for p in diff], source="--resume")
    checkpoint = latest_checkpoint(out)
    if checkpoint is None:
        print(f"projsweep train: no checkpoint under {out}; starting from step 0", flush=True)
        return None, []
    history = json.loads((checkpoint / STATE_FILE).read_text())["history"]
    return checkpoint, history


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b))
        return [d for k in keys for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [prefix.rstrip(".")] if a != b else []


def _json_number(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_metrics(path: Path, result: TrialResult) -> None:
    """`{"status", "final", "history"}` as the contract says (non-finite numbers → null)."""
    doc = {
        "status": result.status,
        "final": {k: _json_number(v) for k, v in result.final.items()},
        "history": [{k: _json_number(v) for k, v in point.items()} for point in result.history],
    }
    path.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n", encoding="utf-8")


def _print_summary(result: TrialResult, seconds: float, out: Path) -> None:
    final = result.final
    wer = (
        f"  WER {final['eval/wer']:.4f}  CER {final['eval/cer']:.4f}" if "eval/wer" in final else ""
    )
    print(f"projsweep train: {result.status} in {seconds:.1f} s{wer}  → {out / 'metrics.json'}")
    if result.message:
        print(f"projsweep train: {result.message}", flush=True)
