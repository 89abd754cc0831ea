"""`projsweep report`: plots comparing a sweep's trials, and one self-contained HTML page.

Everything comes from the experiment directory (Tune's `result.json` lines carry every log point
under `log_points`), so the report needs neither Ray nor MLflow. Plots (PNG, matplotlib's Agg
through `Figure`, no pyplot state):

- `wer_vs_<param>.png`  eval WER at each trial's last evaluation against each swept parameter;
- `wer_vs_throughput.png`  WER against training throughput, with the Pareto front;
- `router_curves.png`  aux / balance / z loss and per-expert load of the top MoE/MOSA trials;
- `wer_curves.png`  eval WER against the optimiser step, every trial.

`index.html` holds them (base64-inlined) and the trial table.
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from orchestration.experiment import Experiment, TrialRecord, status_rows
from orchestration.layout import LOG_POINTS, STEP
from orchestration.space import display_params
from orchestration.spec import LogUniform, RandInt, Uniform

REPORT_DIR = "report"
WER, THROUGHPUT = "eval/wer", "train/samples_per_s"
AUX_KEYS = ("train/aux_loss", "train/balance_loss", "train/z_loss")
LOAD_PREFIX = "router/load/expert_"
TOP_ROUTER_TRIALS = 4
STATE_COLORS = {"completed": "tab:blue", "stopped early": "tab:orange", "unfinished": "tab:gray"}

Curve = list[tuple[int, float]]


# --- data ------------------------------------------------------------------------------------


def trial_curves(trial: TrialRecord) -> dict[str, Curve]:
    """Every metric's (step, value) points from the trial's results; a step seen twice (a trial
    restarted from a checkpoint repeats the steps after it) keeps its first value."""
    curves: dict[str, dict[int, float]] = {}
    for result in trial.results:
        for point in result.get(LOG_POINTS) or []:
            step = int(point[STEP])
            for key, value in point.items():
                if key != STEP and isinstance(value, int | float) and not isinstance(value, bool):
                    curves.setdefault(key, {}).setdefault(step, float(value))
    return {key: sorted(points.items()) for key, points in curves.items()}


def mean_value(curve: Curve) -> float | None:
    values = [v for _, v in curve if math.isfinite(v)]
    return sum(values) / len(values) if values else None


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points (throughput, wer) no other point beats on both (higher throughput, lower WER),
    sorted by throughput."""
    front = [p for p in points if not any(q != p and q[0] >= p[0] and q[1] <= p[1] for q in points)]
    return sorted(set(front))


# --- plots -----------------------------------------------------------------------------------


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _scored(experiment: Experiment) -> list[TrialRecord]:
    return [t for t in experiment.trials if t.last_value(WER) is not None]


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def plot_wer_vs_param(experiment: Experiment, param: str, out_dir: Path) -> Path | None:
    trials = [t for t in _scored(experiment) if param in display_params(t.params)]
    if not trials:
        return None
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    values = [display_params(t.params)[param] for t in trials]
    dist = _param_dist(experiment, param)
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    if numeric and isinstance(dist, Uniform | LogUniform | RandInt):
        xs = [float(v) for v in values]
        if isinstance(dist, LogUniform):
            ax.set_xscale("log")
    else:  # a choice: its values as categories, a little jitter against overlap
        key = float if numeric else str
        categories = sorted({key(v) for v in values})
        xs = [categories.index(key(v)) + _jitter(i) for i, v in enumerate(values)]
        ax.set_xticks(range(len(categories)), [f"{c:g}" if numeric else c for c in categories])
        ax.set_xlim(-0.5, len(categories) - 0.5)
    for x, trial in zip(xs, trials, strict=True):
        color = STATE_COLORS.get(trial.state, "tab:red")
        ax.scatter(x, trial.last_value(WER), color=color, s=36)
    _state_legend(ax, {t.state for t in trials})
    ax.set_xlabel(param)
    ax.set_ylabel("eval WER (last evaluation)")
    ax.set_title(f"WER vs {param}")
    ax.grid(alpha=0.3)
    return _save(fig, out_dir / f"wer_vs_{_safe_name(param)}.png")


def _jitter(i: int) -> float:
    """0, -0.06, +0.06, -0.12, +0.12, 0, …: points of one category side by side."""
    return 0.06 * ((i % 5 + 1) // 2) * (-1 if i % 2 else 1)


def _param_dist(experiment: Experiment, param: str) -> Any:
    """The distribution a displayed parameter was sampled from (the first, if per type)."""
    search = experiment.spec.search
    for space in [search.space, *search.when.values()]:
        for path, dist in space.items():
            if path.removeprefix("model.") == param:
                return dist
    return None


def _state_legend(ax: Any, states: Iterable[str]) -> None:
    for state in sorted(states):
        ax.scatter([], [], color=STATE_COLORS.get(state, "tab:red"), label=state)
    ax.legend(fontsize=8, loc="best")


def plot_wer_vs_throughput(
    experiment: Experiment, curves: Mapping[str, dict[str, Curve]], out_dir: Path
) -> Path | None:
    rows = []
    for trial in _scored(experiment):
        speed = mean_value(curves[trial.trial_id].get(THROUGHPUT, []))
        if speed is not None:
            rows.append((speed, trial.last_value(WER) or 0.0, trial))
    if not rows:
        return None
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for speed, wer, trial in rows:
        ax.scatter(speed, wer, color=STATE_COLORS.get(trial.state, "tab:red"), s=36)
        ax.annotate(trial.trial_id, (speed, wer), fontsize=7, alpha=0.7)
    front = pareto_front([(s, w) for s, w, _ in rows])
    ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="black", lw=1.2)
    ax.scatter([p[0] for p in front], [p[1] for p in front], facecolors="none",
               edgecolors="black", s=90, label="Pareto front")  # fmt: skip
    _state_legend(ax, {t.state for _, _, t in rows})
    ax.set_xlabel("training throughput (samples/s, mean)")
    ax.set_ylabel("eval WER (last evaluation)")
    ax.set_title("WER vs throughput")
    ax.grid(alpha=0.3)
    return _save(fig, out_dir / "wer_vs_throughput.png")


def plot_router_curves(
    experiment: Experiment, curves: Mapping[str, dict[str, Curve]], out_dir: Path
) -> Path | None:
    """Aux losses and per-expert load over steps, one row per top-ranked router trial."""
    routed = [
        t for t in experiment.ranked()
        if any(k.startswith(LOAD_PREFIX) for k in curves[t.trial_id])
    ][:TOP_ROUTER_TRIALS]  # fmt: skip
    if not routed:
        return None
    fig = Figure(figsize=(11, 3.2 * len(routed)))
    axes = fig.subplots(len(routed), 2, squeeze=False)
    for (aux_ax, load_ax), trial in zip(axes, routed, strict=True):
        trial_curves_ = curves[trial.trial_id]
        ptype = display_params(trial.params).get("projector.type", "")
        for key in AUX_KEYS:
            if key in trial_curves_:
                aux_ax.plot(*zip(*trial_curves_[key], strict=True), label=key.split("/")[-1])
        aux_ax.set_title(f"trial {trial.trial_id} {ptype}: aux losses", fontsize=9)
        loads = sorted(
            (k for k in trial_curves_ if k.startswith(LOAD_PREFIX)),
            key=lambda k: int(k.removeprefix(LOAD_PREFIX)),
        )
        for key in loads:
            load_ax.plot(*zip(*trial_curves_[key], strict=True), label=key.split("/")[-1])
        load_ax.set_title(f"trial {trial.trial_id} {ptype}: router load per expert", fontsize=9)
        for ax in (aux_ax, load_ax):
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7, ncol=2)
    return _save(fig, out_dir / "router_curves.png")


def plot_wer_curves(
    experiment: Experiment, curves: Mapping[str, dict[str, Curve]], out_dir: Path
) -> Path | None:
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for trial in experiment.trials:
        curve = curves[trial.trial_id].get(WER, [])
        if curve:
            ptype = display_params(trial.params).get("projector.type", "")
            ax.plot(*zip(*curve, strict=True), marker="o", ms=3, label=f"{trial.trial_id} {ptype}")
    if not ax.lines:
        return None
    ax.set_xlabel("step")
    ax.set_ylabel("eval WER")
    ax.set_title("eval WER, every trial")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, out_dir / "wer_curves.png")


# --- the page --------------------------------------------------------------------------------


def swept_params(experiment: Experiment) -> list[str]:
    return list(dict.fromkeys(k for t in experiment.trials for k in display_params(t.params)))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape("" if value is None else str(value))


def trial_table(experiment: Experiment, curves: Mapping[str, dict[str, Curve]]) -> str:
    rows = status_rows(experiment)
    for row in rows:
        row[f"{THROUGHPUT} (mean)"] = mean_value(curves[row["trial"]].get(THROUGHPUT, []))
    columns = list(dict.fromkeys(k for row in rows for k in row))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_cell(row.get(c))}</td>" for c in columns) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    alt = html.escape(path.stem)
    return f'<figure><img alt="{alt}" src="data:image/png;base64,{data}"></figure>'


STYLE = """body{font-family:sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px}
th{background:#f3f3f3}img{display:block;max-width:100%}figure{margin:0;max-width:100%}
.plots{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}"""


def render_html(experiment: Experiment, images: list[Path], table: str) -> str:
    spec = experiment.spec
    counts: dict[str, int] = {}
    for trial in experiment.trials:
        counts[trial.state] = counts.get(trial.state, 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no trials"
    ranked = experiment.ranked()
    best = f"best trial: {ranked[0].trial_id}" if ranked else "no trial evaluated yet"
    objective = ", ".join(
        f"{m} ({o})" for m, o in zip(spec.search.metrics, spec.search.modes, strict=True)
    )
    figures = "\n".join(_image(p) for p in images)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>projsweep report: {html.escape(spec.name)}</title>
<style>{STYLE}</style></head><body>
<h1>Sweep <code>{html.escape(spec.name)}</code></h1>
<p>{len(experiment.trials)} trials ({html.escape(summary)}); objective {html.escape(objective)};
{html.escape(best)}. Experiment: <code>{html.escape(str(experiment.path))}</code></p>
<h2>Trials</h2>
{table}
<h2>Plots</h2>
<div class="plots">
{figures}
</div>
</body></html>
"""


def write_report(experiment: Experiment, out_dir: Path) -> Path:
    """Write the plots and `index.html` into `out_dir`; returns `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.png"):  # plots of parameters no longer swept must not linger
        old.unlink()
    curves = {t.trial_id: trial_curves(t) for t in experiment.trials}
    images = [plot_wer_vs_param(experiment, p, out_dir) for p in swept_params(experiment)]
    images += [
        plot_wer_vs_throughput(experiment, curves, out_dir),
        plot_router_curves(experiment, curves, out_dir),
        plot_wer_curves(experiment, curves, out_dir),
    ]
    written = [p for p in images if p is not None]
    page = render_html(experiment, written, trial_table(experiment, curves))
    (out_dir / "index.html").write_text(page, encoding="utf-8")
    return out_dir
