"""Forward+backward time of each projector against the seed's (the plain reference).

    python bench/projectors.py [--reps 15] [--types mlp moe] [--threads 2] [--clock wall|cpu]

Encoder 512 / LLM 1024 / batch 8 / T 400, default configs, training mode (jitter, dropout and
aux losses on, as in a training step). Two settings: unpadded (ours gets full `lengths`, as the
trainer passes them) and half the frames padding (lengths (2i+1)/16 · T for i < 8; ours gets the
lengths, the seed gets the padded tensor as is, which is what it did). The two implementations
are timed interleaved, alternating which goes first, so the machine's noise hits both alike.
Columns: the median step of each, their ratio (ours / seed), and the median of the per-rep
ratios ("paired": each rep times the two back to back, so both saw the same machine load; robust
to busy neighbours, and what the targets are checked on): unpadded ≤ 1/0.95, 50% padding ≤ 0.6
for MLP and MoE.

On a machine shared with other jobs, two-thread wall time swings by several × (a descheduled
OpenMP thread stalls its partner at every barrier). `--threads 1 --clock cpu` (process CPU time
of one thread: time spent waiting for a core is not counted) gives steady numbers there.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
# sys.path[0] is this file's folder, where `projectors` would be this very script: replace it with
# the repository root, and add the folder of the seed reference, which lives with the tests.
sys.path[0:1] = [str(ROOT), str(ROOT / "tests" / "projectors")]
from projector_seed import seed_projector  # noqa: E402

from projectors import PROJECTOR_TYPES, build_projector, parse_projector_config  # noqa: E402

ENCODER_DIM, LLM_DIM, BATCH, T = 512, 1024, 8, 400
PADDED_TARGET = {"mlp": 0.6, "moe": 0.6}
UNPADDED_TARGET = 1 / 0.95


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def _step(model: nn.Module, x: Tensor, lengths: Tensor | None, clock: Callable) -> float:
    """Seconds for one forward + backward (ours when `lengths` is given, else the seed's API)."""
    start = clock()
    if lengths is None:
        embeds = model(x)
        aux = model.get_aux_loss() if hasattr(model, "get_aux_loss") else 0.0
    else:
        out = model(x, lengths)
        embeds, aux = out.embeds, out.aux_loss
    (embeds.square().mean() + aux).backward()
    elapsed = clock() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def _time_pair(
    ours: nn.Module, seed: nn.Module, x: Tensor, lengths: Tensor, reps: int, clock: Callable
) -> tuple[float, float, float]:
    """(ours median s, seed median s, median of the per-rep ratios ours / seed)."""
    for _ in range(2):  # warm-up: allocator, oneDNN primitives
        _step(ours, x, lengths, clock), _step(seed, x, None, clock)
    pairs = []
    for rep in range(reps):
        if rep % 2:  # alternate which goes first
            seed_s = _step(seed, x, None, clock)
            ours_s = _step(ours, x, lengths, clock)
        else:
            ours_s = _step(ours, x, lengths, clock)
            seed_s = _step(seed, x, None, clock)
        pairs.append((ours_s, seed_s))
    return (
        statistics.median(o for o, _ in pairs),
        statistics.median(s for _, s in pairs),
        statistics.median(o / s for o, s in pairs),
    )


def bench(kind: str, reps: int, clock: Callable) -> list[tuple[str, float, float, float]]:
    """[(setting, ours ms, seed ms, paired ratio)] for one projector type, default config."""
    cfg = parse_projector_config({"type": kind})
    torch.manual_seed(0)
    seed = seed_projector(cfg, encoder_dim=ENCODER_DIM, llm_dim=LLM_DIM).train()
    ours = build_projector(cfg, encoder_dim=ENCODER_DIM, llm_dim=LLM_DIM).train()
    ours.load_state_dict(seed.state_dict(), strict=True)
    x = torch.randn(BATCH, T, ENCODER_DIM)
    full = torch.full((BATCH,), T)
    half = torch.tensor([(2 * i + 1) * T // (2 * BATCH) for i in range(BATCH)])  # Σ = B·T/2
    padded = x.masked_fill(torch.arange(T)[None, :, None] >= half[:, None, None], 0.0)
    rows = []
    for setting, inputs, lengths in (("unpadded", x, full), ("50% padding", padded, half)):
        ours_s, seed_s, paired = _time_pair(ours, seed, inputs, lengths, reps, clock)
        rows.append((setting, 1e3 * ours_s, 1e3 * seed_s, paired))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15, help="timed steps per implementation")
    parser.add_argument("--types", nargs="+", default=list(PROJECTOR_TYPES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"encoder {ENCODER_DIM} / LLM {LLM_DIM} / batch {BATCH} / T {T}, train mode, "
        f"{args.threads} threads, {args.clock} clock, {args.reps} interleaved fwd+bwd steps each"
    )
    print(
        f"{'type':<8} {'setting':<12} {'ours ms':>8} {'seed ms':>8} {'ratio':>6} {'paired':>6}"
        "  target (paired)"
    )
    for kind in args.types:
        for setting, ours_ms, seed_ms, paired in bench(kind, args.reps, CLOCKS[args.clock]):
            limit = UNPADDED_TARGET if setting == "unpadded" else PADDED_TARGET.get(kind)
            verdict = ""
            if limit is not None:
                verdict = f"≤ {limit:.2f} " + ("ok" if paired <= limit else "MISSED")
            print(
                f"{kind:<8} {setting:<12} {ours_ms:8.1f} {seed_ms:8.1f} "
                f"{ours_ms / seed_ms:6.2f} {paired:6.2f}  {verdict}",
                flush=True,
            )


if __name__ == "__main__":
    main()
