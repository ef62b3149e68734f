"""The LeNet-5 recipe: loads in real pycaffe, has the classic shape, and resolves data paths clearly."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from caffe_evo.caffe_env import load_caffe
from caffe_evo.errors import CaffeEvoError
from caffe_evo.recipe import Recipe


def test_recipe_nets_load_in_caffe(lenet5: Path, data_root: Path, tmp_path: Path) -> None:
    caffe = load_caffe()
    recipe = Recipe.load(lenet5, data_root)
    recipe.write_resolved(tmp_path)
    train = caffe.Net(str(tmp_path / "train_val.prototxt"), caffe.TRAIN)
    val = caffe.Net(str(tmp_path / "train_val.prototxt"), caffe.TEST, stages=["val"])
    deploy = caffe.Net(str(lenet5 / "deploy.prototxt"), caffe.TEST)
    assert train.blobs["data"].data.shape == (64, 1, 28, 28)
    assert val.blobs["data"].data.shape == (100, 1, 28, 28)
    assert deploy.blobs["prob"].data.shape == (1, 10)
    for net in (train, deploy):
        weights = sum(p[0].data.size for p in net.params.values())
        biases = sum(p[1].data.size for p in net.params.values())
        assert (weights, biases) == (430500, 580)
    assert recipe.test_net_names() == ["val", "test"]


def test_copied_recipe_resolves_sources_against_data_root(
    lenet5: Path, data_root: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "my-lenet"
    shutil.copytree(lenet5, copy)
    recipe = Recipe.load(copy, data_root)
    sources = [layer.data_param.source for layer in recipe.train_val.layer if layer.type == "Data"]
    assert sources == [str(data_root / "mnist" / s) for s in ("train_noval_lmdb", "val_lmdb", "test_lmdb")]


def test_missing_data_source_is_one_clear_error(lenet5: Path, tmp_path: Path) -> None:
    with pytest.raises(CaffeEvoError, match=r"layer 'mnist' reads 'mnist/train_noval_lmdb', not found at"):
        Recipe.load(lenet5, tmp_path)


def test_malformed_prototxt_names_the_file(lenet5: Path, data_root: Path, tmp_path: Path) -> None:
    copy = tmp_path / "broken"
    shutil.copytree(lenet5, copy)
    (copy / "deploy.prototxt").write_text('layer { name: "x" type: "Input" top: "data" bogus_field: 3 }\n')
    with pytest.raises(CaffeEvoError, match=r"deploy.prototxt: not a valid NetParameter prototxt"):
        Recipe.load(copy, data_root)


def test_python_layers_need_opt_in(lenet5: Path, data_root: Path, tmp_path: Path) -> None:
    copy = tmp_path / "pylayer"
    shutil.copytree(lenet5, copy)
    deploy = (copy / "deploy.prototxt").read_text()
    deploy += 'layer { name: "hook" type: "Python" bottom: "prob" top: "hooked"\n'
    deploy += '  python_param { module: "m" layer: "L" } }\n'
    (copy / "deploy.prototxt").write_text(deploy)
    with pytest.raises(CaffeEvoError, match="Python layers hook run user code"):
        Recipe.load(copy, data_root)
    assert Recipe.load(copy, data_root, allow_python_layers=True).deploy.layer[-1].type == "Python"
