"""As a user would: `projsweep run` into the default store (no --mlflow-uri), the report's plots,
then `projsweep ui` and the MLflow UI in headless Chromium listing the sweep's runs.

The screenshot is kept as `test-artifacts/mlflow-ui-runs.png`. The browser test needs Debian's
`chromium` (`.ci/run` installs it where it runs as root; elsewhere it is skipped, the rest runs).
Slow: one tiny sweep (about a minute) and a browser.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from chromium import Page, chromium_binary, with_page
from mlflow_helpers import ROOT, MlflowServer, free_port, write_spec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SCREENSHOT = ROOT / "test-artifacts" / "mlflow-ui-runs.png"
EXPAND_PARENT = """(() => {
  const button = document.querySelector('button[data-component-id*="runnamecellrenderer"]');
  if (button) button.click();
  return Boolean(button);
})()"""
CLOSE_SIDE_PANELS = """[...document.querySelectorAll('button[aria-label="Close"]')]
  .map(b => b.click()).length"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)  # the default store, as a user without settings has
    return env


def _api(base: str, path: str, body: dict[str, Any] | None = None, **query: str) -> Any:
    """MLflow's REST API, as the UI calls it: POST with a JSON body, or GET with a query."""
    url = f"{base}/api/2.0/mlflow/{path}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


async def _look_at_runs(page: Page, url: str, names: list[str]) -> str:
    await page.call("Page.navigate", url=url)
    assert await page.wait_js(EXPAND_PARENT, 90), "the runs table did not render"
    text = await page.wait_for(lambda t: all(n in t for n in names), 60)
    await page.evaluate(CLOSE_SIDE_PANELS)  # the assistant panel would cover the table
    await page.wait_for(lambda t: False, 1.5)  # let the layout settle
    await page.screenshot(SCREENSHOT)
    return text


@dataclass
class UI:
    uri: str
    experiment_id: str
    store: Path


@pytest.fixture(scope="module")
def ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UI]:
    """`projsweep run` with no MLflow settings in a fresh directory, then `projsweep ui` there."""
    tmp = tmp_path_factory.mktemp("ui")
    spec = write_spec(tmp, "ui-smoke")
    run = subprocess.run(
        [sys.executable, "-m", "orchestration", "run", str(spec)],
        cwd=tmp, env=_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    port, log = free_port(), tmp / "ui.log"
    with log.open("wb") as out:  # a file, not a pipe: the server logs every request
        proc = subprocess.Popen(
            [sys.executable, "-m", "orchestration", "ui", "--port", str(port)],
            cwd=tmp, env=_env(), stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    server = MlflowServer(tmp, port)  # only to poll its health
    try:
        deadline = time.monotonic() + 120
        while not server.healthy():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "projsweep ui did not come up"
            time.sleep(0.3)
        found = _api(server.uri, "experiments/get-by-name", experiment_name="ui-smoke")
        yield UI(server.uri, found["experiment"]["experiment_id"], tmp / "projsweep-runs")
    finally:
        proc.send_signal(signal.SIGTERM)  # `ui` stops its server's process group with it
        proc.wait(timeout=60)
    assert not server.healthy(), "the MLflow server outlived `projsweep ui`"


def _run_names(ui: UI) -> list[str]:
    runs = _api(ui.uri, "runs/search", {"experiment_ids": [ui.experiment_id]})["runs"]
    return sorted(r["info"]["run_name"] for r in runs)


def test_the_default_store_holds_the_runs_and_the_report_plots(ui: UI) -> None:
    assert (ui.store / "mlflow.db").is_file() and (ui.store / "mlartifacts").is_dir()
    report = ui.store / "ui-smoke" / "report"
    for plot in ("wer_curves", "wer_vs_throughput", "router_curves", "wer_vs_projector.type"):
        assert (report / f"{plot}.png").stat().st_size > 1000, plot
    names = _run_names(ui)
    assert len(names) == 4 and "ui-smoke" in names  # the parent and three trials


@pytest.mark.skipif(chromium_binary() is None, reason="no chromium (CI installs it: .ci/run)")
def test_the_mlflow_ui_lists_the_sweep_in_a_browser(ui: UI) -> None:
    names = _run_names(ui)
    url = f"{ui.uri}/#/experiments/{ui.experiment_id}/runs?workflowType=machine_learning"
    text = with_page(lambda page: _look_at_runs(page, url, names))
    for name in names:
        assert name in text, (name, text[:2000])
    assert SCREENSHOT.stat().st_size > 10_000
