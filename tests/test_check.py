"""`fedge check`, `fedge run`, the ServerApp's one-line config refusal, and .gitignore.

Issue 18: a failed `flwr run` exited 0 after half a minute of Ray start-up, with the
reason at the end of a 30-line traceback, and an unknown key was never named.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from logging import ERROR
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict
from flwr.common.config import parse_config_args
from flwr.common.logger import log

from fedge.check import (
    CONFIG_REFUSED,
    FlwrRunArgs,
    OneLineConfigErrors,
    check_run_config,
    parse_overrides,
    server_config,
)
from fedge.cli import main
from fedge.config import ConfigError, FedgeConfig
from fedge.deploy.processes import free_port
from fedge.flwr_run import run_id_in

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "ray", "sklearn", "numpy", "flwr")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the app's pyproject.toml: what `flwr run <folder>` reads."""
    folder = tmp_path / "app"
    folder.mkdir()
    shutil.copy2(REPO / "pyproject.toml", folder / "pyproject.toml")
    return folder


def _project_with(tmp_path: Path, config_table: str) -> Path:
    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "pyproject.toml").write_text(f"[tool.flwr.app.config]\n{config_table}\n")
    return folder


def _check(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(["check", *argv])
    captured = capsys.readouterr()
    return code, captured.err


# --- fedge check ---------------------------------------------------------------------------


def test_check_refuses_a_bad_value_in_one_line_without_loading_any_engine(project: Path) -> None:
    # The Done-when is "non-zero in under 2 s": what took the time was importing Flower,
    # Ray and torch, so the test asserts none of them is loaded (a timing would flake).
    script = textwrap.dedent(
        f"""
        import json, sys
        from fedge.cli import main
        code = main(["check", {str(project)!r}, "--run-config", "lr='fast'"])
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
        print(json.dumps(heavy))
        sys.exit(code)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == CONFIG_REFUSED, result.stderr
    assert result.stderr.strip().splitlines() == ["error: lr must be a number, got 'fast'"]
    assert json.loads(result.stdout.splitlines()[-1]) == []


def test_check_accepts_the_project_defaults_and_good_overrides(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", str(project)]) == 0
    assert main(["check", str(project), "-c", "num-server-rounds=3", "-c", "lr=0.1"]) == 0
    assert "ok (3 rounds" in capsys.readouterr().out


def test_check_runs_the_simulated_federations_data_plan(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Issue 19: 300 digits clients made every client fail in every round; now refused here
    code, err = _check(capsys, str(project), "--federation-config", "num-supernodes=300")
    assert code == CONFIG_REFUSED
    assert err.startswith("error: partitioner='dirichlet' cannot give each of 300 clients")
    assert "Fix: " in err and "partitioner='iid'" in err and len(err.strip().splitlines()) == 1
    ok = ("--federation-config", "num-supernodes=300", "-c", "partitioner='iid'")
    assert _check(capsys, str(project), *ok)[0] == 0
    assert FlwrRunArgs.parse([str(project)]).num_supernodes() == 10  # the app's federation
    assert FlwrRunArgs.parse([str(project), "--federation-config", "num-supernodes=7"]) == (
        FlwrRunArgs(str(project), None, [], None, ["num-supernodes=7"])
    )


def test_check_names_an_unknown_key_and_the_key_meant(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _check(capsys, str(project), "--run-config", "num-rounds=3")
    assert code == CONFIG_REFUSED
    assert err.strip() == (
        "error: unknown run-config key 'num-rounds'; did you mean 'num-server-rounds'?"
    )


def test_check_refuses_what_flower_would_refuse_or_drop(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = {
        "local_epochs=2": "not in",  # fedge maps it, Flower refuses undeclared keys
        "lr=fast": "strings need quotes",
        "lr=": "'lr=' is not key=value",  # Flower drops it silently
        "lr=0.1 batch-size 64": "'batch-size' is not key=value",
    }
    for override, expected in cases.items():
        code, err = _check(capsys, str(project), "--run-config", override)
        assert code == CONFIG_REFUSED, override
        assert expected in err and len(err.strip().splitlines()) == 1, err


def test_check_reads_a_toml_file_of_overrides(
    project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    overrides = tmp_path / "overrides.toml"
    overrides.write_text('dataset = "breast-cancer"\nsecagg = "yes"\n')
    code, err = _check(capsys, str(project), "--run-config", str(overrides))
    assert code == CONFIG_REFUSED and "secagg must be true or false" in err
    overrides.write_text('dataset = "breast-cancer"\n')
    assert check_run_config(project, [str(overrides)]).dataset == "breast-cancer"


def test_check_names_a_bad_default_and_an_override_the_app_does_not_declare(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    app = _project_with(tmp_path, 'lr = "fast"')
    code, err = _check(capsys, str(app))
    assert code == CONFIG_REFUSED and "lr must be a number" in err
    (app / "pyproject.toml").write_text("[tool.flwr.app.config]\nlr = 0.1\n")
    code, err = _check(capsys, str(app), "-c", "seed=1")
    assert code == CONFIG_REFUSED
    assert "'seed' is not in" in err and "Flower refuses it" in err


@pytest.mark.parametrize("content", [b"[tool.flwr.app.config\nlr = ", b"\x00\xff\xfe garbage"])
def test_a_corrupt_or_missing_pyproject_is_one_line_naming_the_file(
    tmp_path: Path, content: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _check(capsys, str(tmp_path))
    assert code == CONFIG_REFUSED and "no pyproject.toml in" in err
    (tmp_path / "pyproject.toml").write_bytes(content)
    code, err = _check(capsys, str(tmp_path))
    assert code == CONFIG_REFUSED and "pyproject.toml" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    "run_config",
    [
        ["lr=0.1 num-server-rounds=3 secagg=true"],
        ["dataset='/data/my folder' run-name=\"a b\""],
        ["lr=1e-3", "seed=7 optimizer='adam'"],
        ["a.b=1 a.c='x'"],
        ['dp-delta=1e-05 dp-mode="central" resume=false'],
        [],
    ],
)
def test_overrides_parse_exactly_as_flower_parses_them(run_config: list[str]) -> None:
    assert parse_overrides(run_config) == parse_config_args(run_config or None)


def test_a_toml_override_file_parses_as_flower_parses_it(tmp_path: Path) -> None:
    path = tmp_path / "o.toml"
    path.write_text('lr = 0.5\n[nested]\nkey = "v"\n')
    assert parse_overrides([str(path)]) == parse_config_args([str(path)])


def test_flwr_run_arguments_are_read_in_any_order() -> None:
    args = FlwrRunArgs.parse(
        ["--stream", "app", "-c", "a=1", "local", "--federation-config", "num-supernodes=3"]
    )
    assert (args.app, args.superlink, args.run_config) == ("app", "local", ["a=1"])
    assert FlwrRunArgs.parse(["--run-config=b=2", "--run-config", "c=3"]).run_config == [
        "b=2",
        "c=3",
    ]
    assert FlwrRunArgs.parse(["@account/app"]).remote


def test_unknown_key_without_a_close_match_lists_the_keys() -> None:
    with pytest.raises(ConfigError) as info:
        FedgeConfig.from_run_config({"zzz": 1})
    assert "'zzz'" in str(info.value) and "known keys: accept-check" in str(info.value)


# --- the ServerApp's first act --------------------------------------------------------------


@pytest.fixture
def flower_log() -> Iterator[list[str]]:
    """Flower's logger as a list of formatted records (tracebacks included)."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(logging.Formatter("%(message)s").format(record))

    logger = logging.getLogger("flwr")
    handler = Collect()
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)
    for installed in [f for f in logger.filters if isinstance(f, OneLineConfigErrors)]:
        logger.removeFilter(installed)


def _context(run_config: dict[str, object]) -> Context:
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)


def test_server_app_refuses_a_bad_config_before_anything_else() -> None:
    from fedge.server_app.app import main as server_main

    class NoGrid:
        def __getattr__(self, name: str) -> object:
            raise AssertionError(f"the grid was used ({name}) before the config was checked")

    with pytest.raises(ConfigError, match="lr must be a number"):
        server_main(NoGrid(), _context({"lr": "fast"}))  # type: ignore[arg-type]


def test_flower_logs_a_refused_config_in_one_line(flower_log: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        server_config(_context({"num-rounds": 3}))
    # what Flower's ServerApp runner does with an exception from main()
    log(ERROR, "ServerApp raised an exception", exc_info=info.value)
    try:
        raise RuntimeError("a bug")
    except RuntimeError as bug_error:
        log(ERROR, "ServerApp raised an exception", exc_info=bug_error)
    refused, bug = flower_log
    assert refused == (
        "ServerApp raised an exception: unknown run-config key 'num-rounds'; "
        "did you mean 'num-server-rounds'?"
    )
    assert "Traceback" in bug  # any other failure keeps its traceback


# --- fedge run ------------------------------------------------------------------------------


def test_run_id_is_read_from_plain_and_json_output() -> None:
    assert run_id_in("Successfully started run 8164953407266") == 8164953407266
    assert run_id_in('{"success": true, "run-id": "42", "fab-id": "x"}') == 42
    assert run_id_in("Starting local SuperLink on 127.0.0.1:39091...") is None


def test_fedge_run_refuses_a_bad_override_before_flower_starts(
    project: Path, tmp_path: Path
) -> None:
    flwr_home = tmp_path / "flwr-home"  # `flwr run` would create it and start a SuperLink
    env = dict(
        os.environ,
        FLWR_HOME=str(flwr_home),
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
        FLWR_LOCAL_CONTROL_API_PORT=str(free_port()),
    )
    argv = ["run", str(project), "--stream", "--run-config", "num-server-rounds=3 lr='fast'"]
    result = subprocess.run(
        [sys.executable, "-m", "fedge.cli", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == CONFIG_REFUSED, result.stdout + result.stderr
    assert result.stderr.strip() == "error: lr must be a number, got 'fast'"
    assert not flwr_home.exists()


# --- .gitignore -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "certs/ca.key",
        "certs/supernode-0.key",
        "certs/ca.crt",
        "deploy/elsewhere/server.key",
        "export/model.int8.onnx",
        "export/export.json",
        "outputs/run/metrics.jsonl",
        "mlruns/0/meta.yaml",
        ".fedge-deploy/certs/ca.key",
    ],
)
def test_keys_exports_and_results_are_never_committed(path: str) -> None:
    git = shutil.which("git")
    inside = git and subprocess.run(
        [git, "-C", str(REPO), "rev-parse", "--is-inside-work-tree"],
        capture_output=True,
        check=False,
    )
    if not inside or inside.returncode != 0:
        pytest.skip("not a git checkout")
    result = subprocess.run(
        [git, "-C", str(REPO), "check-ignore", "--no-index", "-q", path], check=False
    )
    assert result.returncode == 0, f"{path} is not ignored by .gitignore"


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_fedge_run_exit_status_follows_the_run_on_a_real_superlink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from deploy_helpers import app_copy, deployment

    from fedge.deploy.local import _executable
    from fedge.flwr_run import final_status

    app = app_copy(tmp_path / "app")
    out = tmp_path / "outputs"
    with deployment(1, tmp_path / "deploy") as federation:

        def fedge_run(overrides: str, *stream: str) -> subprocess.CompletedProcess[str]:
            argv = ["run", str(app), federation.connection, *stream, "-c", overrides]
            return subprocess.run(
                [sys.executable, "-m", "fedge.cli", *argv],
                cwd=federation.directory,  # never in a project: flwr may rewrite pyproject.toml
                env=federation.flwr_env(),
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )

        # Passes the check, then the ServerApp refuses it: no checkpoint to resume.
        failed = fedge_run(f"resume=true run-name='missing' output-dir='{out}'", "--stream")
        # Plain `flwr run` skips fedge's check: the ServerApp's first act refuses the value.
        plain = federation.flwr(
            "run", str(app), federation.connection, "--stream", "-c", "lr='fast'", timeout=300
        )
        completed = fedge_run(  # not streamed: fedge run waits for the run to finish
            f"num-server-rounds=1 local-epochs=1 min-train-nodes=1 min-available-nodes=1 "
            f"output-dir='{out}' run-name='ok'"
        )
        monkeypatch.chdir(federation.directory)
        for key, value in federation.flwr_env().items():
            monkeypatch.setenv(key, value)
        plain_id = run_id_in(plain.stdout)
        assert plain_id is not None, plain.stdout[-3000:]
        plain_status = final_status(_executable("flwr"), plain_id, federation.connection)

    log = failed.stdout + failed.stderr
    assert failed.returncode == 1, log[-3000:]
    assert "does not exist; check output-dir and run-name" in failed.stderr, log[-3000:]
    assert "Traceback" not in log, log[-3000:]

    assert plain.returncode == 0  # Flower's own exit status, the reason for `fedge run`
    assert "lr must be a number, got 'fast'" in plain.stdout, plain.stdout[-3000:]
    assert "Traceback" not in plain.stdout + plain.stderr, plain.stdout[-3000:]
    assert plain_status[0] == "finished:failed" and "lr must be a number" in plain_status[1]

    assert completed.returncode == 0, (completed.stdout + completed.stderr)[-3000:]
    assert "finished:completed" in completed.stderr
    assert (out / "ok" / "final_model.pt").is_file()
