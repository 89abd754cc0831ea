"""Several nodes on this machine (`ray.cluster_utils.Cluster`: a head and two worker nodes) and a
directory they all see (`--storage` and `PROJSWEEP_CACHE` on it): trials spread over the nodes;
a worker node removed mid-sweep sends its trial to the other node, from its last checkpoint; the
sweep completes; MLflow holds every log point once and agrees with `status` / `export`.

Slow: three tiny trials, two at a time, on a corpus built in the shared cache.
"""

from __future__ import annotations

import pytest
from fault_cases import NodeLossRun, node_loss
from mlflow import MlflowClient
from mlflow_audit import Audit, audit

from orchestration.experiment import load_experiment

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> tuple[NodeLossRun, Audit]:
    run = node_loss(tmp_path_factory.mktemp("nodes"))
    client = MlflowClient(f"sqlite:///{run.shared / 'mlflow.db'}")
    return run, audit(run.experiment_dir, client, run.finished_before)


def test_trials_spread_over_the_worker_nodes(nodes: tuple[NodeLossRun, Audit]) -> None:
    run, result = nodes
    first_nodes = {ids[0] for ids in result.nodes.values()}
    assert first_nodes == set(run.worker_ids), result.nodes  # the CPU-less head ran none


def test_the_removed_nodes_trial_goes_on_from_its_checkpoint_elsewhere(
    nodes: tuple[NodeLossRun, Audit],
) -> None:
    run, result = nodes
    (survivor,) = set(run.worker_ids) - {run.removed}
    moved = [tid for tid, ids in result.nodes.items() if ids[0] == run.removed]
    assert len(moved) == 1, result.nodes
    assert result.nodes[moved[0]] == [run.removed, survivor]
    assert result.attempts[moved[0]] == 2
    assert set(result.states.values()) == {"completed"}
    trial = next(t for t in load_experiment(run.experiment_dir).trials if t.trial_id == moved[0])
    assert [r["step"] for r in trial.evaluations] == [20, 40, 60, 60]  # each evaluation once
    result.assert_clean()  # no step trained twice, nothing lost, MLflow agrees


def test_the_shared_directory_holds_the_feature_cache_and_the_checkpoints(
    nodes: tuple[NodeLossRun, Audit],
) -> None:
    run, _ = nodes
    cache = run.shared / "cache"
    assert len(list(cache.glob("corpora/digits-*/dataset_dict.json"))) == 1
    assert len(list(cache.glob("features/*/meta.json"))) == 2  # train and eval splits, once
    for trial in load_experiment(run.experiment_dir).trials:
        trial_dir = run.experiment_dir / f"trial_{trial.trial_id}"
        assert list(trial_dir.glob("checkpoint_*/projector.safetensors")), trial_dir
