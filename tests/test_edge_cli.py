"""`fedge export`, `fedge edge predict` and `fedge edge bench` as argparse subcommands."""

from __future__ import annotations

import argparse
import json
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
import torch

from fedge.edge import artifacts
from fedge.edge.commands import register
from fedge.edge.export_command import register_export
from fedge.models import ModelSpec, build_model, save_model, state_to_numpy


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedge")
    subparsers = parser.add_subparsers(dest="command", required=True)
    register(subparsers)
    register_export(subparsers)
    return parser


def _run(*argv: str) -> int:
    args = _parser().parse_args(list(argv))
    return args.func(args)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    spec = ModelSpec("cnn", (1, 8, 8), 10)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_model(path, spec, state_to_numpy(build_model(spec)))
    return path


@pytest.fixture(scope="module")
def exported(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export")
    with redirect_stdout(StringIO()):
        code = _run(
            "export",
            str(checkpoint),
            "--out",
            str(out),
            "--calibration-samples",
            "64",
            "--latency-repeats",
            "2",
        )
    assert code == 0
    return out


def test_export_prints_the_report_it_writes(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = _run(
        "export",
        str(checkpoint),
        "--out",
        str(tmp_path),
        "--quantization",
        "dynamic",
        "--latency-repeats",
        "2",
    )
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / artifacts.REPORT).read_text())
    assert printed["quantization"] == "dynamic"
    assert printed["eval_samples"] == 360  # digits' held-out 20%


def test_static_export_calibrates_on_the_requested_sample_count(exported: Path) -> None:
    report = json.loads((exported / artifacts.REPORT).read_text())
    assert report["quantization"] == "static-qdq"
    assert report["calibration_samples"] == 64


def test_export_of_a_missing_checkpoint_fails_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run("export", str(tmp_path / "none.pt"), "--out", str(tmp_path)) == 1
    assert "error: no model file at" in capsys.readouterr().err


def test_predict_prints_one_class_per_sample(
    exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32))
    model = str(exported / artifacts.MODEL_INT8)
    assert _run("edge", "predict", model, "--input", str(tmp_path / "x.npy")) == 0
    lines = capsys.readouterr().out.split()
    assert len(lines) == 3 and all(0 <= int(c) < 10 for c in lines)

    assert _run("edge", "predict", model, "--input", str(tmp_path / "x.npy"), "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["predictions"] == [int(c) for c in lines]
    assert all(0.1 <= p <= 1 for p in result["confidence"])  # top-1 of 10 classes


def test_predict_on_a_missing_input_fails_with_a_message(
    exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = str(exported / artifacts.MODEL_INT8)
    assert _run("edge", "predict", model, "--input", str(tmp_path / "none.npy")) == 1
    assert "error: no input file at" in capsys.readouterr().err


def test_bench_prints_json(exported: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = str(exported / artifacts.MODEL_INT8)
    assert _run("edge", "bench", model, "--batch-sizes", "1", "8", "--repeats", "3") == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["latency_ms"]) == {"batch_1", "batch_8"}
    assert result["model"] == model
