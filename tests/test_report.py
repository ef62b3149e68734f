"""Every generation is compacted and measured; `caffe-evo compact` and `report` on a real lineage."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from caffe_evo.caffe_env import load_caffe
from caffe_evo.evolution import EvolutionConfig, start
from data_prep.lmdb_io import iter_datum_lmdb

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    folder = tmp_path_factory.mktemp("report") / "run"
    config = EvolutionConfig.from_json(
        {
            "recipe": str(ROOT / "prototxt" / "lenet5"),
            "data_root": str(data_root),
            "generations": 2,
            "ancestor_iters": 60,
            "iters_per_generation": 30,
            "cluster_factor": "0.7",
            "max_accuracy_drop": 1.0,
        }
    )
    start(config, folder, progress=False).run()
    return folder


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "caffe_evo.cli", *args], capture_output=True, text=True)


def test_every_generation_is_compacted_and_measured(run: Path, data_root: Path) -> None:
    caffe = load_caffe()
    images = np.stack([img for _, img, _ in list(iter_datum_lmdb(data_root / "mnist" / "test_lmdb"))[:32]])
    images = images.astype(np.float32) / 256
    for gen in ("gen_000", "gen_001", "gen_002"):
        metrics = json.loads((run / gen / "metrics.json").read_text())
        cost = metrics["cost"]
        assert cost["full"]["macs"] == 2293000
        assert cost["compact"]["macs"] <= cost["full"]["macs"]
        assert cost["full"]["latency_ms_batch1"] > 0 and cost["compact"]["images_per_s_batch64"] > 0
        assert cost["compact"]["file_bytes"] == (run / gen / "compact" / "weights.caffemodel").stat().st_size
        full = caffe.Net(
            str(run / gen / "deploy.prototxt"), str(run / gen / "weights.caffemodel"), caffe.TEST
        )
        small = caffe.Net(
            str(run / gen / "compact" / "deploy.prototxt"),
            str(run / gen / "compact" / "weights.caffemodel"),
            caffe.TEST,
        )
        for net in (full, small):
            net.blobs["data"].reshape(*images.shape)
            net.reshape()
        want = full.forward(data=images)["prob"].copy()
        got = small.forward(data=images)["prob"]
        assert np.max(np.abs(want - got)) <= 1e-5
    assert cost["compact"]["clusters"] == metrics["clusters"] < 580


def test_compact_command_rebuilds_a_generation(run: Path) -> None:
    result = _cli("compact", str(run / "gen_001"), "--repeats", "3")
    assert result.returncode == 0, result.stderr
    assert "params 431,080 ->" in result.stdout
    assert not list((run / "gen_001").glob(".compact-staging-*"))
    bad = _cli("compact", str(run))
    assert bad.returncode == 2 and "not a generation folder" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_report(run: Path) -> None:
    result = _cli("report", str(run))
    assert result.returncode == 0, result.stderr
    report = run / "report"
    with (report / "lineage.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert [row["generation"] for row in table] == ["0", "1", "2"]
    assert float(table[2]["synaptic_efficiency"]) > 1.0 and table[2]["fps_batch1_compact"]
    assert float(table[2]["ort_1t_fps_batch1_compact"]) > 0 < float(table[0]["ort_all_fps_batch1_compact"])
    text = (report / "report.md").read_text()
    assert "9.71x" in text and "| 2 |" in text and "Compact network:" in text
    assert "In ONNX Runtime (CPU, one thread, the fp32 ONNX export): batch-1 speed" in text
    for name in ("architecture.png", "accuracy.png", "speed.png"):
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _cli("report", str(run / "nowhere")).returncode == 2
