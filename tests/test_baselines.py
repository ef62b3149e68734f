"""Baselines share the engine: magnitude pruning, L1 filter pruning, the re-initialised control, compare."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from caffe_evo import lineage, masking
from caffe_evo.baselines import l1_filter_masks, magnitude_masks
from caffe_evo.evolution import EvolutionConfig, read_params, start

ROOT = Path(__file__).resolve().parent.parent


def test_magnitude_per_layer_and_global() -> None:
    weights = {"a": np.array([[0.1, -0.5], [0.3, 0.0]]), "b": np.array([[2.0, -0.2, 0.05, 1.0]])}
    masks = {"a": np.array([[True, True], [True, False]]), "b": np.ones((1, 4), bool)}
    per_layer = magnitude_masks(weights, masks, 1 / 3, "layer")  # 1 of a's 3 living, 1 of b's 4
    assert per_layer["a"].tolist() == [[False, True], [True, False]]
    assert per_layer["b"].tolist() == [[True, True, False, True]]
    both = magnitude_masks(weights, masks, 3 / 7, "global")  # the 3 smallest living of 7: 0.05, 0.1, 0.2
    assert both["a"].tolist() == [[False, True], [True, False]]
    assert both["b"].tolist() == [[True, False, False, True]]


def test_l1_filter_removes_whole_kernels_and_spares_the_classifier() -> None:
    rng = np.random.default_rng(0)
    weights = {"conv": rng.standard_normal((6, 2, 3, 3)), "fc": rng.standard_normal((4, 6))}
    weights["conv"][[1, 4]] *= 0.01
    masks = {name: np.ones(w.shape, bool) for name, w in weights.items()}
    out = l1_filter_masks(weights, masks, 1 / 3, frozenset({"fc"}))
    assert out["conv"].reshape(6, -1).all(axis=1).tolist() == [True, False, True, True, False, True]
    assert out["conv"].reshape(6, -1).any(axis=1).tolist() == [True, False, True, True, False, True]
    assert out["fc"].all()


def _run(tmp: Path, data_root: Path, name: str, **changes) -> Path:
    values = {
        "recipe": str(ROOT / "prototxt" / "lenet5"),
        "data_root": str(data_root),
        "generations": 2,
        "ancestor_iters": 50,
        "iters_per_generation": 20,
        "max_accuracy_drop": 1.0,
        "measure": False,
        **changes,
    }
    start(EvolutionConfig.from_json(values), tmp / name, progress=False).run()
    return tmp / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("baselines")
    evolved = _run(tmp, data_root, "evolution", cluster_factor="0.7")
    return {
        "evolution": evolved,
        # Without the dependency step, so that the counts are the pruning rule's own.
        "magnitude": _run(
            tmp, data_root, "magnitude", method="magnitude", prune_fraction=0.5, drop_unread=False
        ),
        "l1": _run(tmp, data_root, "l1", method="l1-filter", prune_fraction=0.4),
        "control": _run(
            tmp,
            data_root,
            "control",
            method="retrain-mask",
            mask_source=str(evolved / "gen_002"),
            init="reinit",
            generations=1,
            iters_per_generation=40,
        ),
    }


def test_baselines_run_through_the_shared_engine(runs: dict[str, Path]) -> None:
    magnitude = lineage.generations(runs["magnitude"])
    assert [m["synapses"] for m in magnitude] == [430500, 215250, 107625]
    l1 = lineage.generations(runs["l1"])
    assert l1[1]["synapses"] == l1[2]["synapses"] < 430500  # one shot, then fine-tuning only
    assert l1[1]["clusters"] == 12 + 30 + 300 + 10
    # The dependency step removes the next layer's synapses on the pruned filters, as Li et al. do.
    l1_masks = masking.load(lineage.generation_dir(runs["l1"], 1) / "masks.npz")
    pruned_maps = ~l1_masks["conv1"].reshape(20, -1).any(axis=1)
    assert pruned_maps.sum() == 8 and not l1_masks["conv2"][:, pruned_maps].any()
    control = lineage.generation_dir(runs["control"], 1)
    evolved = masking.load(runs["evolution"] / "gen_002" / "masks.npz")
    retrained = masking.load(control / "masks.npz")
    assert all(np.array_equal(evolved[name], retrained[name]) for name in evolved)
    params = read_params(control / "deploy.prototxt", control / "weights.caffemodel")
    ancestor = read_params(
        runs["control"] / "gen_000" / "deploy.prototxt", runs["control"] / "gen_000" / "weights.caffemodel"
    )
    kept = evolved["conv1"]
    assert not np.allclose(params["conv1"][0][kept], ancestor["conv1"][0][kept])  # not inherited


def test_compare(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    result = subprocess.run(
        [sys.executable, "-m", "caffe_evo.cli", "compare", *map(str, runs.values()), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    text = (out / "compare.md").read_text()
    for label in ("evolution/cluster", "magnitude/layer", "l1-filter", "retrain-mask", "108x"):
        assert label in text
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert "magnitude/layer,2,1" in (out / "compare.csv").read_text().replace(" ", "")
