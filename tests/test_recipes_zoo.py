"""The AlexNet, ResNet-20/56 and STL-10 recipes: each loads, trains a few iterations, refuses bad edits."""

from __future__ import annotations

import shutil
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import yaml

from caffe_evo.dependency import tied_channels
from caffe_evo.errors import CaffeEvoError
from caffe_evo.evolution import EvolutionConfig, evolvable_layers
from caffe_evo.recipe import Recipe
from caffe_evo.training import TrainOptions, train
from data_prep.lmdb_io import iter_datum_lmdb, write_datum_lmdb
from data_prep.standin import STAND_INS, reshape

RECIPES = Path(__file__).resolve().parent.parent / "prototxt"
ZOO = {
    "alexnet-cifar10": "cifar10",
    "resnet20-cifar10": "cifar10",
    "resnet56-cifar10": "cifar10",
    "stl10": "stl10",
}


@pytest.fixture(scope="module")
def tiny_root(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32 real Fashion-MNIST images per split in each recipe's shape, under the recipes' and the
    stand-ins' folder names."""
    root = tmp_path_factory.mktemp("zoo-data")
    records = list(islice(iter_datum_lmdb(data_root / "fashion-mnist" / "train_lmdb"), 32))
    images = np.stack([image[0] for _, image, _ in records])
    labels = np.array([label for _, _, label in records])
    for spec in STAND_INS.values():
        shaped = reshape(images, spec)
        for folder in (spec.name, spec.stands_for):
            for split in ("train_noval", "val", "test"):
                (root / folder).mkdir(exist_ok=True)
                write_datum_lmdb(root / folder / f"{split}_lmdb", shaped, labels)
    return root


def small_batches(recipe: Recipe) -> Recipe:
    for layer in recipe.train_val.layer:
        if layer.type == "Data":
            layer.data_param.batch_size = 4
    recipe.solver.test_iter[:] = [1] * len(recipe.solver.test_iter)
    return recipe


@pytest.mark.parametrize("name", sorted(ZOO))
def test_recipe_trains(name: str, tiny_root: Path, tmp_path: Path) -> None:
    recipe = small_batches(Recipe.load(RECIPES / name, tiny_root))
    assert {"val", "test"} <= set(recipe.test_net_names())
    metrics = train(recipe, tmp_path / "run", TrainOptions(max_iter=2, progress=False, bn_batches=2))
    assert metrics["iterations"] == 2 and np.isfinite(metrics["final_loss"])
    assert 0.0 <= metrics["val_accuracy"] <= 1.0 and metrics["stand_in"] is None
    has_bn = name.startswith("resnet")
    assert (metrics["batchnorm_reestimation"] is not None) == has_bn
    layers, protected = evolvable_layers(recipe, None)
    assert protected == frozenset(layers[-1:])


@pytest.mark.parametrize("name", sorted(ZOO))
def test_stand_in_reads_its_own_folder(name: str, tiny_root: Path) -> None:
    recipe = Recipe.load(RECIPES / name, tiny_root, stand_in=True)
    sources = [layer.data_param.source for layer in recipe.train_val.layer if layer.type == "Data"]
    stand_in = {"cifar10": "fashion32", "stl10": "fashion96"}[ZOO[name]]
    assert recipe.stand_in == stand_in and all(f"/{stand_in}/" in source for source in sources)


def test_resnet20_tied_classes() -> None:
    """Stage s ties its input (conv1 or the projection) and every block's second convolution."""
    recipe = RECIPES / "resnet20-cifar10"
    deploy = recipe / "deploy.prototxt"
    names = [f"s{s}b{b}_conv{c}" for s in (1, 2, 3) for b in (1, 2, 3) for c in (1, 2)]
    ties = tied_channels(deploy, ["conv1", "s2b1_proj", "s3b1_proj", *names, "fc"])
    for stage, head in ((1, "conv1"), (2, "s2b1_proj"), (3, "s3b1_proj")):
        for block in (1, 2, 3):
            assert np.array_equal(ties[f"s{stage}b{block}_conv2"], ties[head])
            assert (ties[f"s{stage}b{block}_conv1"] == -1).all()
    assert len(np.unique(np.concatenate([ties["conv1"], ties["s2b1_proj"], ties["s3b1_proj"]]))) == 112


def edited(tmp_path: Path, name: str, old: str, new: str) -> Path:
    folder = tmp_path / name
    shutil.copytree(RECIPES / name, folder)
    path = folder / "train_val.prototxt"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    return folder


def test_bad_edits_are_one_line(tiny_root: Path, tmp_path: Path) -> None:
    bn_learnt = edited(
        tmp_path, "resnet20-cifar10", 'type: "BatchNorm"\n', 'type: "BatchNorm"\n  param { lr_mult: 1 }\n'
    )
    with pytest.raises(CaffeEvoError, match="conv1_bn.*BatchNorm.*non-zero lr_mult") as bn:
        Recipe.load(bn_learnt, tiny_root)
    mismatch = edited(
        tmp_path,
        "resnet56-cifar10",
        'name: "s1b1_conv2"\n  type: "Convolution"\n  bottom: "s1b1_conv1"\n  top: "s1b1_conv2"\n'
        "  param { lr_mult: 1 }\n  convolution_param {\n    num_output: 16",
        'name: "s1b1_conv2"\n  type: "Convolution"\n  bottom: "s1b1_conv1"\n  top: "s1b1_conv2"\n'
        "  param { lr_mult: 1 }\n  convolution_param {\n    num_output: 12",
    )
    with pytest.raises(CaffeEvoError, match="s1b1_sum.*Eltwise.*'conv1' 16, 's1b1_conv2' 12") as elt:
        Recipe.load(mismatch, tiny_root)
    with pytest.raises(CaffeEvoError, match="lenet5 has no stand-in") as none:
        Recipe.load(RECIPES / "lenet5", tiny_root, stand_in=True)
    for error in (bn, elt, none):
        assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_evolution_config_is_valid(name: str) -> None:
    data = yaml.safe_load((RECIPES / name / "evolution.yaml").read_text())
    EvolutionConfig.from_json({**data, "recipe": str(RECIPES / name)}).validate()
