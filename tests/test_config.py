"""FedgeConfig validation, pyproject defaults, resolve_path and the run folder."""

from __future__ import annotations

import dataclasses
import json
import random
import tomllib
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from fedge.config import ConfigError, FedgeConfig, resolve_path
from fedge.server_app.run_folder import (
    Checkpoint,
    RunFolder,
    restore_rng_state,
    rng_state,
)

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _pyproject_app_config() -> dict[str, object]:
    with open(PYPROJECT, "rb") as handle:
        return tomllib.load(handle)["tool"]["flwr"]["app"]["config"]


# --- defaults -------------------------------------------------------------------------


def test_every_default_matches_pyproject_and_vice_versa() -> None:
    in_pyproject = _pyproject_app_config()
    in_code = FedgeConfig().to_run_config()
    assert sorted(in_pyproject) == sorted(in_code)
    for key, value in in_pyproject.items():
        assert in_code[key] == value, key
        assert type(in_code[key]) is type(value), key


def test_pyproject_config_validates_to_the_defaults() -> None:
    assert FedgeConfig.from_run_config(_pyproject_app_config()) == FedgeConfig()


def test_empty_run_config_gives_defaults_and_kebab_keys_map_to_fields() -> None:
    assert FedgeConfig.from_run_config({}) == FedgeConfig()
    config = FedgeConfig.from_run_config(
        {"num-server-rounds": 3, "dirichlet-alpha": 2.0, "run-name": "x", "resume": True}
    )
    assert (config.num_server_rounds, config.dirichlet_alpha) == (3, 2.0)
    assert (config.run_name, config.resume) == ("x", True)


def test_to_run_config_round_trips() -> None:
    config = FedgeConfig.from_run_config({"lr": 0.01, "optimizer": "adam", "seed": 7})
    assert FedgeConfig.from_run_config(config.to_run_config()) == config


def test_from_context_reads_the_run_config() -> None:
    context = Context(
        run_id=1,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config={"num-server-rounds": 4, "partitioner": "iid"},
    )
    config = FedgeConfig.from_context(context)
    assert (config.num_server_rounds, config.partitioner) == (4, "iid")


def test_an_integer_is_accepted_for_a_float_key_and_stored_as_float() -> None:
    config = FedgeConfig.from_run_config({"lr": 1, "round-timeout": 30})
    assert config.lr == 1.0 and isinstance(config.lr, float)
    assert isinstance(config.round_timeout, float)


# --- errors name the key ----------------------------------------------------------------


def test_unknown_key_is_rejected_and_named() -> None:
    with pytest.raises(ConfigError, match="num-rounds") as info:
        FedgeConfig.from_run_config({"num-rounds": 3})
    assert "num-server-rounds" in str(info.value)  # the known keys are listed


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("num-server-rounds", "3"),
        ("num-server-rounds", 2.5),
        ("num-server-rounds", True),
        ("batch-size", None),
        ("lr", "fast"),
        ("lr", True),
        ("server-momentum", [0.9]),
        ("resume", 1),
        ("resume", "true"),
        ("dataset", 5),
        ("optimizer", 1),
        ("output-dir", Path("/tmp")),
    ],
)
def test_wrong_type_is_rejected_and_named(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=key):
        FedgeConfig.from_run_config({key: value})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("num-server-rounds", 0),
        ("fraction-train", 0.0),
        ("fraction-train", 1.5),
        ("fraction-evaluate", -0.1),
        ("min-train-nodes", 0),
        ("round-timeout", 0.0),
        ("local-epochs", 0),
        ("batch-size", 0),
        ("lr", 0.0),
        ("lr", -0.1),
        ("momentum", 1.0),
        ("momentum", -0.5),
        ("proximal-mu", -1.0),
        ("server-lr", 0.0),
        ("server-momentum", 1.0),
        ("dirichlet-alpha", 0.0),
        ("classes-per-client", 0),
        ("test-fraction", 0.0),
        ("test-fraction", 1.0),
        ("val-fraction", 1.0),
        ("val-fraction", -0.1),
        ("edge-clients", -1),
        ("seed", -1),
    ],
)
def test_out_of_range_is_rejected_and_named(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=key) as info:
        FedgeConfig.from_run_config({key: value})
    assert "must be in" in str(info.value)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("fraction-train", 1.0),
        ("fraction-evaluate", 0.0),
        ("momentum", 0.0),
        ("server-momentum", 0.0),
        ("val-fraction", 0.0),
        ("proximal-mu", 0.0),
        ("seed", 0),
        ("edge-clients", 0),
    ],
)
def test_closed_bounds_are_accepted(key: str, value: object) -> None:
    config = FedgeConfig.from_run_config({key: value})
    assert config.to_run_config()[key] == value


@pytest.mark.parametrize(
    ("key", "value", "choice"),
    [
        ("optimizer", "rmsprop", "adam"),
        ("partitioner", "random", "pathological"),
        ("model", "resnet", "mlp"),
    ],
)
def test_bad_choice_is_rejected_named_and_lists_choices(key: str, value: str, choice: str) -> None:
    with pytest.raises(ConfigError, match=key) as info:
        FedgeConfig.from_run_config({key: value})
    assert choice in str(info.value) and value in str(info.value)


def test_min_available_below_min_train_is_rejected_naming_both() -> None:
    with pytest.raises(ConfigError) as info:
        FedgeConfig.from_run_config({"min-train-nodes": 5, "min-available-nodes": 3})
    assert "min-available-nodes" in str(info.value) and "min-train-nodes" in str(info.value)


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_every_field_is_documented() -> None:
    for spec in dataclasses.fields(FedgeConfig):
        assert spec.metadata["help"], spec.name


# --- resolve_path -----------------------------------------------------------------------


def test_relative_path_resolves_against_fedge_workdir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    workdir = tmp_path / "work"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("FEDGE_WORKDIR", str(workdir))
    assert resolve_path("outputs/run") == (workdir / "outputs" / "run").resolve()
    assert resolve_path("./a/../b") == (workdir / "b").resolve()


def test_relative_path_without_fedge_workdir_uses_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FEDGE_WORKDIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_path("outputs") == tmp_path.resolve() / "outputs"


def test_absolute_path_stays_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDGE_WORKDIR", str(tmp_path / "work"))
    target = tmp_path / "results"
    assert resolve_path(str(target)) == target


def test_home_and_environment_variables_expand(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FEDGE_TEST_ROOT", str(tmp_path / "root"))
    assert resolve_path("~/runs") == tmp_path / "home" / "runs"
    assert resolve_path("$FEDGE_TEST_ROOT/runs") == tmp_path / "root" / "runs"


# --- run folder -------------------------------------------------------------------------


def _config(output_dir: Path | str, **overrides: object) -> FedgeConfig:
    return FedgeConfig.from_run_config({"output-dir": str(output_dir), **overrides})


def _checkpoint(round_: int = 2) -> Checkpoint:
    arrays = {
        "features.0.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
        "head.bias": np.array([1.5, -2.0], dtype=np.float32),
    }
    velocity = {"head.bias": np.array([0.25, 0.5], dtype=np.float32)}
    state = {"rng": rng_state(), "run_config": {"seed": 3}}
    return Checkpoint(round_, arrays, {"velocity": velocity}, state)


def test_run_folder_lives_under_output_dir_and_run_name(tmp_path: Path) -> None:
    folder = RunFolder.for_config(_config(tmp_path, **{"run-name": "exp1"}))
    assert folder.path == tmp_path / "exp1" and folder.path.is_dir()


def test_relative_output_dir_lands_under_fedge_workdir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDGE_WORKDIR", str(tmp_path))
    monkeypatch.chdir(tmp_path.parent)
    folder = RunFolder.for_config(_config("outs", **{"run-name": "r"}))
    assert folder.path == tmp_path.resolve() / "outs" / "r" and folder.path.is_dir()


def test_empty_run_name_gets_a_fresh_timestamped_folder(tmp_path: Path) -> None:
    folder = RunFolder.for_config(_config(tmp_path))
    assert folder.path.parent == tmp_path and folder.path.name


def test_existing_run_is_not_overwritten_without_resume(tmp_path: Path) -> None:
    config = _config(tmp_path, **{"run-name": "taken"})
    RunFolder.for_config(config).save_checkpoint(_checkpoint())
    checkpoint_file = tmp_path / "taken" / "checkpoint.npz"
    before = checkpoint_file.read_bytes()
    with pytest.raises(ConfigError, match="resume") as info:
        RunFolder.for_config(config)
    assert "taken" in str(info.value)
    assert checkpoint_file.read_bytes() == before


def test_resume_without_checkpoint_errors_clearly(tmp_path: Path) -> None:
    (tmp_path / "fresh").mkdir()
    with pytest.raises(ConfigError) as info:
        RunFolder.for_config(_config(tmp_path, **{"run-name": "fresh", "resume": True}))
    message = str(info.value)
    assert "checkpoint.npz" in message and "resume" in message and "fresh" in message


def test_resume_needs_a_run_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="run-name"):
        RunFolder.for_config(_config(tmp_path, resume=True))


def test_resume_reopens_the_existing_run(tmp_path: Path) -> None:
    RunFolder.for_config(_config(tmp_path, **{"run-name": "r"})).save_checkpoint(_checkpoint(5))
    folder = RunFolder.for_config(_config(tmp_path, **{"run-name": "r", "resume": True}))
    assert folder.load_checkpoint().round == 5


def test_checkpoint_round_trips_arrays_strategy_state_and_round(tmp_path: Path) -> None:
    folder = RunFolder.for_config(_config(tmp_path, **{"run-name": "ck"}))
    saved = _checkpoint(7)
    folder.save_checkpoint(saved)
    loaded = folder.load_checkpoint()
    assert loaded.round == 7
    assert loaded.arrays.keys() == saved.arrays.keys()
    for name, value in saved.arrays.items():
        np.testing.assert_array_equal(loaded.arrays[name], value)
        assert loaded.arrays[name].dtype == value.dtype
    np.testing.assert_array_equal(
        loaded.strategy_arrays["velocity"]["head.bias"],
        saved.strategy_arrays["velocity"]["head.bias"],
    )
    assert loaded.state == json.loads(json.dumps(saved.state))
    assert not list(folder.path.glob(".*.tmp"))  # atomic write left no temp file


def test_keep_metrics_through_drops_rows_after_the_checkpoint(tmp_path: Path) -> None:
    folder = RunFolder.for_config(_config(tmp_path, **{"run-name": "m"}))
    for round_ in (1, 2, 3):
        folder.append_metrics({"round": round_, "test_accuracy": round_ / 10})
    folder.keep_metrics_through(2)
    assert [row["round"] for row in folder.read_metrics()] == [1, 2]
    folder.append_metrics({"round": 3, "test_accuracy": 0.9})
    assert [row["round"] for row in folder.read_metrics()] == [1, 2, 3]


def test_rng_state_restores_python_and_numpy_sequences() -> None:
    random.seed(11)
    np.random.seed(11)
    state = json.loads(json.dumps(rng_state()))  # what a checkpoint stores
    expected = (random.random(), np.random.random(3).tolist())
    random.seed(99)
    np.random.seed(99)
    restore_rng_state(state)
    assert (random.random(), np.random.random(3).tolist()) == expected
