"""Multi-parent synthesis (m parents mate), efficiency-aware fitness, and the family tree, on hand-checked
masks and on a real 2-generation LeNet-5/MNIST run with 2 parents."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import short_eval_recipe

from caffe_evo import lineage, masking
from caffe_evo.encoding import EncodingConfig, LayerDNA, encode
from caffe_evo.errors import CaffeEvoError
from caffe_evo.evolution import EvolutionConfig, Parent, start
from caffe_evo.executors import ExecutorOptions
from caffe_evo.selection import Fitness
from caffe_evo.synthesis import Environment, Factor, combine_parents, sample_offspring

T, F = True, False


def _two_parents() -> tuple[list[dict[str, LayerDNA]], list[dict[str, np.ndarray]]]:
    masks = [{"ip": np.array([[T, T], [F, F]])}, {"ip": np.array([[T, F], [T, F]])}]
    dnas = [
        {"ip": LayerDNA(np.array([[1.0, 0.5], [0.0, 0.0]]), np.array([1.0, 0.0]))},
        {"ip": LayerDNA(np.array([[0.5, 0.0], [0.2, 0.0]]), np.array([0.6, 0.4]))},
    ]
    return dnas, masks


def _hereditary(masks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The hereditary mask of parents with these masks (Parent.mate's; the parameters do not matter)."""
    parents = [
        Parent(1, Path(f"p{i}"), {n: [np.zeros(m.shape)] for n, m in own.items()}, own, [f"p{i}"])
        for i, own in enumerate(masks)
    ]
    return Parent.mate(parents).masks


@pytest.mark.parametrize(
    ("rule", "synapse", "cluster"),
    [
        ("mean", [[0.75, 0.25], [0.1, 0.0]], [0.8, 0.2]),
        ("max", [[1.0, 0.5], [0.2, 0.0]], [1.0, 0.4]),
        ("min", [[0.5, 0.0], [0.0, 0.0]], [0.6, 0.0]),
    ],
)
def test_mating_rules_on_hand_checked_encodings(rule: str, synapse: list, cluster: list) -> None:
    dnas, masks = _two_parents()
    dna = combine_parents(dnas, masks, rule)
    np.testing.assert_allclose(dna["ip"].synapse, synapse)
    np.testing.assert_allclose(dna["ip"].cluster, cluster)
    # heredity: what lives in either parent may live on, what is dead in both stays dead
    assert _hereditary(masks)["ip"].tolist() == [[T, T], [T, F]]


def test_mating_refuses_bad_input() -> None:
    dnas, masks = _two_parents()
    with pytest.raises(CaffeEvoError, match="unknown --mating rule 'sum'"):
        combine_parents(dnas, masks, "sum")
    other = [masks[0], {"ip": np.ones((3, 2), bool)}]
    with pytest.raises(CaffeEvoError, match="layer 'ip': parents of different shapes"):
        combine_parents(dnas, other, "mean")


def test_mate_takes_each_living_parameter_from_the_fittest_parent_that_has_it() -> None:
    _, masks = _two_parents()
    fittest = Parent(
        1, Path("a"), {"ip": [np.array([[1.0, 2.0], [0.0, 0.0]]), np.array([5.0, 0.0])]}, masks[0], ["a"]
    )
    second = Parent(
        1, Path("b"), {"ip": [np.array([[9.0, 0.0], [3.0, 0.0]]), np.array([7.0, 8.0])]}, masks[1], ["b"]
    )
    mated = Parent.mate([fittest, second])
    assert mated.params["ip"][0].tolist() == [[1.0, 2.0], [3.0, 0.0]]
    assert mated.params["ip"][1].tolist() == [5.0, 8.0]  # neuron 1 lives only in the second parent
    assert mated.masks["ip"].tolist() == [[T, T], [T, F]]
    assert mated.sources == ["a", "b"] and mated.folder == Path("a")
    assert fittest.masks["ip"].tolist() == [[T, T], [F, F]]  # the parents are not changed


def test_heredity_with_two_parents() -> None:
    rng = np.random.default_rng(4)
    weights = {"conv": rng.normal(size=(6, 3, 3, 3)), "ip": rng.normal(size=(10, 24))}
    parents = [{name: rng.random(w.shape) < 0.6 for name, w in weights.items()} for _ in range(2)]
    config = EncodingConfig()
    dnas = [encode(weights, masks, config, frozenset({"ip"})) for masks in parents]
    dna, union = combine_parents(dnas, parents, "mean"), _hereditary(parents)
    env = Environment(Factor((0.8,)), Factor((0.9,)))
    only_second = 0
    for seed in range(20):
        child = sample_offspring(dna, union, env, 1, np.random.default_rng(seed), frozenset({"ip"}))
        for name in weights:
            assert not np.any(child[name] & ~parents[0][name] & ~parents[1][name])
            only_second += int(np.count_nonzero(child[name] & ~parents[0][name]))
    assert only_second > 0  # the second parent's synapses do reach the offspring


def test_the_survival_rate_is_met_against_the_fittest_parent() -> None:
    """Drawn from the union of two parents' masks, the offspring keeps F times the fittest parent's
    clusters and synapses, not F times the union's (which would shrink the lineage more slowly)."""
    rng = np.random.default_rng(5)
    weights = {"conv": rng.normal(size=(40, 8, 3, 3)), "ip": rng.normal(size=(10, 40))}
    parents = [{name: rng.random(w.shape) < 0.5 for name, w in weights.items()} for _ in range(2)]
    for masks in parents:  # each parent lost 30% of the conv's kernels: the union holds about 51% more
        masks["conv"][rng.random(40) < 0.3] = False
    config = EncodingConfig()
    dnas = [encode(weights, masks, config, frozenset({"ip"})) for masks in parents]
    dna, union = combine_parents(dnas, parents, "mean"), _hereditary(parents)
    env = Environment(Factor((0.8,)), Factor((0.7,)))
    fittest = parents[0]["conv"]
    counts: dict[bool, list[tuple[int, int]]] = {False: [], True: []}
    for seed in range(40):
        for against in (False, True):
            reference = {name: parents[0][name] for name in weights} if against else None
            draw = np.random.default_rng(seed)
            child = sample_offspring(dna, union, env, 1, draw, frozenset({"ip"}), reference_masks=reference)
            child = child["conv"]
            counts[against].append((int(child.reshape(40, -1).any(axis=1).sum()), int(child.sum())))
    kernels, synapses = (np.mean([c[i] for c in counts[True]]) for i in (0, 1))
    assert kernels == pytest.approx(0.7 * fittest.reshape(40, -1).any(axis=1).sum(), rel=0.06)
    # the surviving kernels are the strong ones, which hold more synapses than the average kernel: the
    # synapse count is near F_c * F_s of the fittest parent's, not exact
    assert synapses == pytest.approx(0.7 * 0.8 * fittest.sum(), rel=0.12)
    union_kernels, union_synapses = (np.mean([c[i] for c in counts[False]]) for i in (0, 1))
    assert union_kernels == pytest.approx(0.7 * union["conv"].reshape(40, -1).any(axis=1).sum(), rel=0.06)
    assert union_kernels > 1.3 * kernels and union_synapses > 1.6 * synapses


def test_fitness_metric_floor_and_efficiency_penalty() -> None:
    big = {"val_accuracy": 0.990, "synapses": 1000, "attempt": 0, "candidate": 0}
    small = {"val_accuracy": 0.985, "synapses": 500, "attempt": 0, "candidate": 1}
    assert Fitness().rank([big, small], 0.9) == [big, small]
    # 0.01 per doubling: halving the synapses outweighs 0.005 of accuracy
    assert Fitness(penalty=0.01).rank([big, small], 0.9) == [small, big]
    assert Fitness(penalty=0.01).rank([big, small], 0.988) == [big]  # the floor is on the metric itself
    tie = {**big, "candidate": 2, "synapses": 900}
    assert Fitness().rank([big, tie], 0.9) == [tie, big]  # equal accuracy: fewer synapses
    detector = {"val_mAP": 0.5, "synapses": 10, "attempt": 0, "candidate": 0}
    assert Fitness("val_mAP").rank([detector], 0.4) == [detector]
    with pytest.raises(CaffeEvoError, match="fitness metric 'val_mAP' is not in the metrics"):
        Fitness("val_mAP").rank([big], 0.0)
    with pytest.raises(CaffeEvoError, match="--fitness-penalty must be a non-negative number"):
        Fitness(penalty=-1.0)
    # the penalty on clusters: fewer kernels outweigh 0.001 of accuracy though they hold more synapses
    dense = {"val_accuracy": 0.990, "synapses": 800, "clusters": 40, "attempt": 0, "candidate": 0}
    sparse = {"val_accuracy": 0.989, "synapses": 900, "clusters": 30, "attempt": 0, "candidate": 1}
    assert Fitness(penalty=0.01).rank([sparse, dense], 0.9) == [dense, sparse]
    assert Fitness(penalty=0.01, size="clusters").rank([dense, sparse], 0.9) == [sparse, dense]
    with pytest.raises(CaffeEvoError, match="--fitness-size must be one of synapses, clusters"):
        Fitness(size="kernels")


@pytest.fixture(scope="module")
def two_parent_run(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    recipe = short_eval_recipe(tmp_path_factory.mktemp("recipes") / "lenet5-tiny")
    config = EvolutionConfig(
        recipe=str(recipe),
        data_root=str(data_root),
        generations=2,
        population=2,
        parents=2,
        seed=2,
        ancestor_iters=60,
        iters_per_generation=20,
        max_accuracy_drop=1.0,
        measure=False,
    )
    run = tmp_path_factory.mktemp("mp") / "run"
    start(config, run, progress=False, executor=ExecutorOptions(workers=2)).run()
    return run


def test_two_parents_lineage(two_parent_run: Path) -> None:
    run = two_parent_run
    first = lineage.read_json(run / "gen_001" / "metrics.json")
    survivors = first["selection"]["survivors"]
    assert len(survivors) == 2 and survivors[0] == first["selection"]["winner"]
    second_parent = f"candidates/gen_001/a{survivors[1][0]}_c{survivors[1][1]}"
    union = {}
    for folder in ("gen_001", second_parent):
        for name, mask in masking.load(run / folder / "masks.npz").items():
            union[name] = union.get(name, np.zeros_like(mask)) | mask
    for k in range(2):
        child = run / "candidates" / "gen_002" / f"a0_c{k}"
        assert lineage.read_json(child / "metrics.json")["parents"] == ["gen_001", second_parent]
        for name, mask in masking.load(child / "masks.npz").items():
            assert not np.any(mask & ~union[name])  # dead in both parents: dead in the offspring
    for k in range(2):  # generation 1 has one parent, the ancestor
        child = run / "candidates" / "gen_001" / f"a0_c{k}" / "metrics.json"
        assert lineage.read_json(child)["parents"] == ["gen_000"]
    tree = lineage.family_tree(run).splitlines()
    assert len(tree) == 4 and tree[0].startswith("gen_001 ") and tree[1].startswith(second_parent)
    assert tree[2].startswith("gen_002 ") and tree[2].endswith(f"<- gen_001, {second_parent}")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "caffe_evo.cli", *args], capture_output=True, text=True, timeout=600
    )


def test_cli_family_tree_and_bad_parents(two_parent_run: Path, tmp_path: Path) -> None:
    shown = _cli("lineage", str(two_parent_run))
    assert shown.returncode == 0, shown.stderr
    assert "family tree" in shown.stdout and "<- gen_001, candidates/gen_001/" in shown.stdout
    recipe = two_parent_run / "gen_000"  # any folder: the option is refused before the recipe is read
    bad = _cli(
        "evolve", "--recipe", str(recipe), "--out", str(tmp_path / "r"), "--population", "2", "--parents", "3"
    )
    assert (
        bad.returncode == 2
        and bad.stderr == "caffe-evo: --parents must be between 1 and the population (2), got 3\n"
    )
    size = _cli("evolve", "--recipe", str(recipe), "--out", str(tmp_path / "r"), "--fitness-size", "kernels")
    assert size.returncode == 2 and size.stderr == (
        "caffe-evo: --fitness-size must be one of synapses, clusters, got 'kernels'\n"
    )
    assert not (tmp_path / "r").exists()


def test_lineage_into_a_closed_pipe_is_quiet(two_parent_run: Path) -> None:
    """`caffe-evo lineage RUN | head`: the reader leaving early is no error to report."""
    child = subprocess.Popen(
        [sys.executable, "-m", "caffe_evo.cli", "lineage", str(two_parent_run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    child.stdout.close()  # before the child has imported anything, so its first write finds no reader
    stderr = child.stderr.read().decode()
    assert child.wait(timeout=60) == 141 and stderr == ""


def test_mate_takes_a_revived_maps_batchnorm_and_scale_from_the_parent_that_has_it() -> None:
    """Map 2 is dead in the fittest parent (its BatchNorm statistics and Scale parameters 0) and alive in
    the second: it comes with the second's Scale values, and with its statistics rescaled to the fittest
    parent's stored factor, so that Caffe's mean (sum / factor) is the second parent's."""
    from google.protobuf import text_format

    from caffe_evo.caffe_env import caffe_pb2

    deploy = text_format.Parse(
        """
        layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" }
        layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }
        layer { name: "scale" type: "Scale" bottom: "conv" top: "conv" }
        layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip" }
        """,
        caffe_pb2().NetParameter(),
    )

    def parent(name: str, alive: list[bool], bn: list[list[float]], scale: list[list[float]]) -> Parent:
        conv = np.array([[1.0, 2.0] if a else [0.0, 0.0] for a in alive])
        params = {
            "conv": [conv, conv[:, 0].copy()],
            "bn": [np.array(blob, np.float32) for blob in bn],
            "scale": [np.array(blob, np.float32) for blob in scale],
            "ip": [np.ones((2, 3)), np.ones(2)],
        }
        return Parent(1, Path(name), params, {"conv": conv != 0, "ip": np.ones((2, 3), bool)}, [name])

    fittest = parent("a", [T, T, F], [[1, 2, 0], [3, 4, 0], [2]], [[0.5, 0.6, 0], [0.1, 0.2, 0]])
    second = parent("b", [T, F, T], [[10, 20, 30], [40, 50, 60], [4]], [[7, 8, 9], [1, 2, 3]])
    mated = Parent.mate([fittest, second], deploy)
    mean, variance, factor = mated.params["bn"]
    assert mean.tolist() == [1, 2, 15] and variance.tolist() == [3, 4, 30] and factor.tolist() == [2]
    assert mean[2] / factor[0] == 30 / 4 and variance[2] / factor[0] == 60 / 4
    gamma, beta = mated.params["scale"]
    np.testing.assert_array_equal(gamma, np.float32([0.5, 0.6, 9]))
    np.testing.assert_array_equal(beta, np.float32([0.1, 0.2, 3]))
    assert fittest.params["bn"][0].tolist() == [1, 2, 0]  # the parents are not changed
    # statistics stored with a factor of 0 are 0 to Caffe: the revived map's are 0 as well
    unset = parent("c", [T, F, T], [[10, 20, 30], [40, 50, 60], [0]], [[7, 8, 9], [1, 2, 3]])
    mean, variance, _ = Parent.mate([fittest, unset], deploy).params["bn"]
    assert mean.tolist() == [1, 2, 0] and variance.tolist() == [3, 4, 0]
