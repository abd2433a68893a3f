"""name=, tags=[...] and notes=, and the reproduction record, in run.json, the sweep summary,
MLflow and TensorBoard."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from cnnexp.results.record import git_state, reproduction
from cnnexp.sweep.table import summarise
from cnnexp.tracking.names import run_identity, run_label
from conftest import SMALL, run_cli


def cfg_of(**top):
    return OmegaConf.create({"name": None, "tags": [], "notes": "", **top})


def test_a_run_is_named_by_name_else_by_its_overrides_without_the_naming_keys():
    overrides = ["optim.lr=0.01", "name=base", "tags=[a,b]", "notes=why"]
    assert run_label(overrides) == "optim.lr=0.01"
    assert run_identity(cfg_of(name="base", tags=["a", "b"], notes="why"), overrides) == {
        "name": "base", "tags": ["a", "b"], "notes": "why"}
    assert run_identity(cfg_of(), ["optim.lr=0.01"])["name"] == "optim.lr=0.01"


def test_a_sweeps_name_names_its_jobs_unless_the_name_is_swept(tmp_path):
    (tmp_path / "multirun.yaml").write_text("name: lr-sweep\ntags: [s]\nhydra:\n  overrides:\n    task: "
                                            "[name=lr-sweep, 'optim.lr=0.01,0.1']\n")
    job = ["name=lr-sweep", "optim.lr=0.1"]
    assert run_identity(cfg_of(name="lr-sweep"), job, tmp_path)["name"] == "lr-sweep/optim.lr=0.1"
    (tmp_path / "multirun.yaml").write_text("name: null\nhydra:\n  overrides:\n    task: ['name=a,b']\n")
    assert run_identity(cfg_of(name="b"), ["name=b"], tmp_path)["name"] == "b"


def test_reproduction_records_the_command_line_the_machine_and_each_repositorys_commit(tmp_path, monkeypatch):
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                       check=True, capture_output=True)
    git("init", "-q")
    (tmp_path / "my_models.py").write_text("class Net:\n    pass\n")
    git("add", "my_models.py")
    git("commit", "-qm", "net")
    commit = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    monkeypatch.syspath_prepend(str(tmp_path))
    elsewhere = tmp_path.parent / f"{tmp_path.name}-cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # a working dir outside any repository
    record = reproduction({"model": {"_target_": "my_models.Net"}, "optim": {"_target_": "torch.optim.SGD"}})
    assert record["command_line"] == shlex.join(sys.orig_argv)
    assert record["git"]["working_dir"] is None
    assert record["git"]["model._target_"] == {"module": "my_models", "root": str(tmp_path), "commit": commit,
                                               "dirty": False}
    assert "optim._target_" not in record["git"]  # an installed package: its version says what it is
    assert record["packages"]["torch"] and record["packages"]["python"] and record["hostname"] and record["cpu"]
    assert record["gpu"] is None
    (tmp_path / "my_models.py").write_text("class Net:\n    changed = True\n")
    assert git_state(tmp_path)["dirty"] is True
    sys.modules.pop("my_models", None)


def test_the_sweep_summary_has_each_jobs_name_and_tags(tmp_path):
    for job, (name, tags) in enumerate([("s/optim.lr=0.1", ["x"]), ("s/optim.lr=0.2", ["x", "y"])]):
        (tmp_path / str(job)).mkdir()
        (tmp_path / str(job) / "run.json").write_text(json.dumps(
            {"status": "completed", "name": name, "tags": tags, "overrides": [f"optim.lr=0.{job + 1}"]}))
        (tmp_path / str(job) / "metrics.csv").write_text(
            "epoch,train_loss,train_acc,test_loss,test_acc,lr\n1,2.0,0.1,2.0,0.1,0.1\n")
    table = summarise(tmp_path)[0]
    assert list(table["name"]) == ["s/optim.lr=0.1", "s/optim.lr=0.2"]
    assert list(table["tags"]) == ["x", "x,y"]


# ------------------------------------------------------------------ one real run, read back from each store
@pytest.fixture(scope="module")
def named_run(tmp_path_factory):
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    cwd = tmp_path_factory.mktemp("named")
    result = run_cli([*SMALL, "trainer.max_epochs=1", "trainer.device=cpu", "trainer.cpu_step=eager", "logger=all",
                      "name=baseline", "tags=[first,cpu-only]", "notes=the first try",
                      "hydra.run.dir=outputs/${name}"], cwd, env={"MLFLOW_TRACKING_URI": ""})
    assert result.returncode == 0, result.stderr
    return cwd, cwd / "outputs" / "baseline", result


@pytest.mark.slow  # one real run with both trackers: MLflow's import and a new store take seconds
def test_name_tags_and_notes_reach_run_json_and_the_output_dir(named_run):
    cwd, run_dir, _ = named_run
    record = json.loads((run_dir / "run.json").read_text())  # hydra.run.dir=outputs/${name}
    assert (record["name"], record["tags"], record["notes"]) == ("baseline", ["first", "cpu-only"], "the first try")
    assert "name=baseline" in record["reproduction"]["command_line"]
    assert record["reproduction"]["cwd"] == str(cwd)


@pytest.mark.slow  # one real run with both trackers: MLflow's import and a new store take seconds
def test_name_tags_and_notes_reach_mlflow_with_the_standard_source_tags(named_run):
    import mlflow

    cwd, run_dir, result = named_run
    uri = f"sqlite:///{cwd / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("cnnexp").experiment_id])
    tags = run.data.tags
    assert run.info.run_name == "baseline"
    assert tags["first"] == tags["cpu-only"] == "true" and tags["cnnexp.tags"] == "first,cpu-only"
    assert tags["mlflow.note.content"] == "the first try"
    assert tags["mlflow.source.type"] == "LOCAL" and "name=baseline" in tags["mlflow.source.name"]
    # where the run went, said at its end
    assert f"MLflow: run 'baseline' (id {run.info.run_id})" in result.stderr + result.stdout
    assert f"mlflow ui --backend-store-uri {uri}" in result.stderr + result.stdout


@pytest.mark.slow  # one real run with both trackers: MLflow's import and a new store take seconds
def test_name_and_tags_are_tensorboard_hparams_and_the_notes_are_text(named_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    _, run_dir, _ = named_run
    (log_dir,) = (run_dir / "tensorboard").iterdir()
    events = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    events.Reload()
    data = [plugin_data_pb2.HParamsPluginData.FromString(raw)
            for raw in events.PluginTagToContent("hparams").values()]
    start = next(d.session_start_info for d in data if d.HasField("session_start_info"))
    assert start.hparams["name"].string_value == "baseline"
    assert start.hparams["tags"].string_value == "first,cpu-only"
    assert "notes/text_summary" in events.Tags()["tensors"]
