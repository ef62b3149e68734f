"""Environmental factors and offspring sampling: calibration, reproducibility, heredity, protection."""

from __future__ import annotations

import numpy as np
import pytest

from caffe_evo.encoding import EncodingConfig, LayerDNA, bias_mask, encode, living_clusters
from caffe_evo.errors import CaffeEvoError
from caffe_evo.synthesis import Environment, Factor, sample_offspring


def network(rng: np.random.Generator) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A tiny conv + classifier pair with a few synapses already dead."""
    weights = {"conv": rng.normal(size=(6, 3, 2, 2)), "ip": rng.normal(size=(4, 24))}
    masks = {name: rng.random(w.shape) < 0.9 for name, w in weights.items()}
    return {name: w * masks[name] for name, w in weights.items()}, masks


def env(value: float, mode: str = "survival") -> Environment:
    return Environment(synapse=Factor((value,), mode), cluster=Factor((value,), mode))


@pytest.mark.parametrize("bad", [(0.0,), (1.5,), (-0.1,), (0.9, float("nan")), ()])
def test_factor_rejects_values_outside_unit_interval(bad: tuple[float, ...]) -> None:
    with pytest.raises(CaffeEvoError, match="factor"):
        Factor(bad)


def test_factor_error_names_the_value() -> None:
    with pytest.raises(CaffeEvoError, match=r"^environmental factor must be in \(0, 1\], got 1.5$"):
        Factor((0.9, 1.5))


def test_factor_rejects_unknown_mode_and_generation_zero() -> None:
    with pytest.raises(CaffeEvoError, match="factor mode 'literal' is not one of: multiplier, survival"):
        Factor((0.5,), "literal")
    with pytest.raises(CaffeEvoError, match="generation must be >= 1"):
        Factor((0.5,)).at(0)


def test_schedule_picks_value_per_generation_and_repeats_last() -> None:
    schedule = Factor.parse("0.9, 0.8,0.7", "multiplier")
    assert schedule == Factor((0.9, 0.8, 0.7), "multiplier")
    assert [schedule.at(g) for g in (1, 2, 3, 4, 50)] == [0.9, 0.8, 0.7, 0.7, 0.7]
    assert Factor.parse("1", "survival").at(7) == 1.0
    assert Factor([0.5], "survival").values == (0.5,)


@pytest.mark.parametrize("text", ["", "abc", "0.9,,0.7", "0.9;0.8", "0", "2"])
def test_parse_rejects_bad_text(text: str) -> None:
    with pytest.raises(CaffeEvoError, match="factor"):
        Factor.parse(text, "survival")


def test_multiplier_is_literal_f_times_p() -> None:
    probs = np.array([[0.2, 1.0], [0.5, 0.9]])
    living = np.array([[True, True], [False, True]])
    got = Factor((0.9, 0.5), "multiplier").apply(probs, living, 2)
    np.testing.assert_allclose(got, [[0.1, 0.5], [0.0, 0.45]], rtol=1e-15)


@pytest.mark.parametrize("target", [0.05, 0.3, 0.7, 0.85, 0.95])
def test_survival_mode_expected_fraction_equals_target(target: float) -> None:
    rng = np.random.default_rng(3)
    probs = rng.uniform(0.2, 1.0, size=(8, 5))
    probs[0, :3] = [1.0, 1.0, 0.0]  # ties and a unit that cannot survive
    living = rng.random(probs.shape) < 0.8
    got = Factor((target,)).apply(probs, living, 1)
    assert abs(got[living].mean() - target) < 1e-9
    assert not got[~living].any() and got.max() <= 1.0
    # Calibration keeps the order of the probabilities (one common scale, capped at 1).
    order = np.argsort(probs[living], kind="stable")
    assert (np.diff(got[living][order]) >= -1e-15).all()


def test_survival_mode_unreachable_target_keeps_every_positive_unit() -> None:
    probs = np.array([0.0, 0.3, 0.0, 0.01, 0.0, 0.9])
    living = np.array([True, True, True, True, False, True])
    np.testing.assert_array_equal(Factor((0.9,)).apply(probs, living, 1), [0, 1, 0, 1, 0, 1])
    np.testing.assert_array_equal(Factor((1.0,)).apply(probs, living, 1), [0, 1, 0, 1, 0, 1])
    assert not Factor((0.5,)).apply(probs, np.zeros(6, bool), 1).any()


def test_network_scope_meets_the_target_over_all_layers_with_one_scale() -> None:
    rng = np.random.default_rng(11)
    probs = {"conv": rng.uniform(0.6, 1.0, size=(4, 6)), "fc": rng.uniform(0.0, 0.5, size=(10, 30))}
    living = {name: rng.random(p.shape) < 0.9 for name, p in probs.items()}
    got = Factor((0.6,), "survival", "network").apply_layers(probs, living, 1)
    total = sum(int(living[n].sum()) for n in probs)
    assert abs(sum(got[n][living[n]].sum() for n in probs) / total - 0.6) < 1e-9
    # One common scale: the layer of strong units keeps far more than the target, the weak one less.
    assert got["conv"][living["conv"]].mean() > 0.9 and got["fc"][living["fc"]].mean() < 0.6
    uncapped = {name: living[name] & (got[name] < 1.0) for name in probs}
    scale = np.concatenate([got[n][uncapped[n]] / probs[n][uncapped[n]] for n in probs])
    assert scale.size > 100
    np.testing.assert_allclose(scale, scale[0], rtol=1e-12)
    assert not got["fc"][~living["fc"]].any()
    # Layer scope meets the target in each layer; the single-layer apply() is the layer scope.
    per_layer = Factor((0.6,), "survival", "layer").apply_layers(probs, living, 1)
    for name in probs:
        assert abs(per_layer[name][living[name]].mean() - 0.6) < 1e-9
        np.testing.assert_array_equal(per_layer[name], Factor((0.6,)).apply(probs[name], living[name], 1))


def test_factor_rejects_unknown_scope() -> None:
    with pytest.raises(CaffeEvoError, match="factor scope 'global' is not one of: layer, network"):
        Factor((0.5,), "survival", "global")


def test_network_scope_excludes_protected_clusters_from_calibration() -> None:
    rng = np.random.default_rng(12)
    weights, masks = network(rng)
    protected = frozenset({"ip"})
    dna = encode(weights, masks, EncodingConfig(), protected)
    scoped = Environment(Factor((1.0,), scope="network"), Factor((0.5,), scope="network"))
    kept = [
        living_clusters(
            sample_offspring(dna, masks, scoped, 1, np.random.default_rng(s), protected)["conv"], "kernel"
        )
        for s in range(400)
    ]
    # conv is the only evolving layer at cluster level, so it alone carries the 50% target.
    assert abs(np.mean(kept) / living_clusters(masks["conv"], "kernel").mean() - 0.5) < 0.05


def test_network_scope_of_one_layer_equals_layer_scope() -> None:
    rng = np.random.default_rng(13)
    weights = {"fc": rng.normal(size=(20, 30))}
    parent = {"fc": rng.random((20, 30)) < 0.8}
    dna = encode(weights, parent, EncodingConfig())
    masks = [
        sample_offspring(
            dna,
            parent,
            Environment(Factor((0.7,), scope=s), Factor((0.8,), scope=s)),
            1,
            np.random.default_rng(3),
        )["fc"]
        for s in ("layer", "network")
    ]
    np.testing.assert_array_equal(masks[0], masks[1])


@pytest.mark.parametrize("scope", ["layer", "network"])
def test_a_layer_with_its_own_factor_meets_it_alone(scope: str) -> None:
    rng = np.random.default_rng(14)
    probs = {
        name: rng.uniform(0.1, 1.0, size=shape)
        for name, shape in [("a", (5, 8)), ("b", (9, 4)), ("c", (30,))]
    }
    living = {name: rng.random(p.shape) < 0.85 for name, p in probs.items()}
    shared = Factor((0.5,), scope=scope)
    environment = Environment(shared, shared, layer_cluster={"a": Factor((0.9, 0.95), scope=scope)})
    got = environment.effective("cluster", probs, living, 2)
    assert list(got) == ["a", "b", "c"]
    assert abs(got["a"][living["a"]].mean() - 0.95) < 1e-9
    others = np.concatenate([got[n][living[n]] for n in ("b", "c")])
    assert abs(others.mean() - 0.5) < 1e-9
    # The synapse level has no layer of its own here: all three share its factor.
    synapse = environment.effective("synapse", probs, living, 2)
    assert abs(np.concatenate([synapse[n][living[n]] for n in probs]).mean() - 0.5) < 1e-9


@pytest.mark.parametrize("mode", ["survival", "multiplier"])
def test_size_exponent_spares_small_layers(mode: str) -> None:
    rng = np.random.default_rng(15)
    probs = {"small": rng.uniform(0.2, 0.9, size=(10,)), "large": rng.uniform(0.2, 0.9, size=(40, 25))}
    living = {name: np.ones(p.shape, bool) for name, p in probs.items()}
    got = Factor((0.6,), mode, size_exponent=0.5).apply_layers(probs, living, 1)
    spared = 0.6 ** ((10 / 1000) ** 0.5)  # 0.6 ** 0.1
    if mode == "survival":
        assert abs(got["small"].mean() - spared) < 1e-9 and abs(got["large"].mean() - 0.6) < 1e-9
    else:
        np.testing.assert_allclose(got["small"], spared * probs["small"], rtol=1e-15)
        np.testing.assert_allclose(got["large"], 0.6 * probs["large"], rtol=1e-15)
    plain = Factor((0.6,), mode).apply_layers(probs, living, 1)
    np.testing.assert_array_equal(plain["large"], got["large"])
    # A single layer is its own largest layer: the exponent changes nothing.
    np.testing.assert_array_equal(
        Factor((0.6,), mode, size_exponent=0.5).apply(probs["small"], living["small"], 1), plain["small"]
    )


@pytest.mark.parametrize("bad", [-0.1, 11.0, float("nan")])
def test_size_exponent_out_of_range_is_refused(bad: float) -> None:
    with pytest.raises(CaffeEvoError, match="size exponent must be in"):
        Factor((0.5,), size_exponent=bad)


def test_survival_mode_empirical_fraction_on_a_larger_layer() -> None:
    rng = np.random.default_rng(0)
    weights = {"fc": rng.normal(size=(100, 50))}
    parent = {"fc": np.ones((100, 50), bool)}
    dna = encode(weights, parent, EncodingConfig(level="synapse"))
    child = sample_offspring(dna, parent, env(0.7), 1, rng)["fc"]
    assert abs(child.mean() - 0.7) < 0.02
    dna = encode(weights, parent, EncodingConfig())
    split = Environment(synapse=Factor((1.0,)), cluster=Factor((0.85,)))
    child = sample_offspring(dna, parent, split, 1, rng)["fc"]
    assert abs(bias_mask(child).mean() - 0.85) < 0.1
    np.testing.assert_array_equal(child, np.repeat(bias_mask(child)[:, None], 50, axis=1))


def test_same_seed_same_masks_different_seed_different() -> None:
    weights, masks = network(np.random.default_rng(1))
    dna = encode(weights, masks, EncodingConfig())
    first, again, other = (
        sample_offspring(dna, masks, env(0.7), 1, np.random.default_rng(seed)) for seed in (5, 5, 6)
    )
    assert list(first) == ["conv", "ip"]
    assert all(np.array_equal(first[name], again[name]) for name in masks)
    assert not all(np.array_equal(first[name], other[name]) for name in masks)


@pytest.mark.parametrize(
    "config", [EncodingConfig(), EncodingConfig(level="synapse", reading="exp_minus_one")]
)
def test_dead_synapse_never_comes_back(config: EncodingConfig) -> None:
    rng = np.random.default_rng(2)
    weights, masks = network(rng)
    for generation in range(1, 7):
        dna = encode(weights, masks, config)
        child = sample_offspring(dna, masks, env(0.8, "multiplier"), generation, rng)
        for name in masks:
            assert child[name].dtype == np.bool_ and not (child[name] & ~masks[name]).any()
        weights = {
            name: (w + rng.normal(scale=0.1, size=w.shape)) * child[name] for name, w in weights.items()
        }
        masks = child
    assert sum(m.sum() for m in masks.values()) < 0.5 * (6 * 3 * 2 * 2 + 4 * 24)


@pytest.mark.parametrize("granularity", ["kernel", "channel"])
def test_protected_layer_never_loses_an_output(granularity: str) -> None:
    rng = np.random.default_rng(4)
    weights, masks = network(rng)
    config, protected = EncodingConfig(granularity=granularity), frozenset({"ip"})
    for generation in range(1, 6):
        dna = encode(weights, masks, config, protected)
        masks = sample_offspring(dna, masks, env(0.05), generation, rng, protected)
        assert bias_mask(masks["ip"]).all()
        weights = {name: w * masks[name] for name, w in weights.items()}
    assert not bias_mask(masks["conv"]).all()


def test_protection_does_not_shift_other_layers_draws() -> None:
    weights, masks = network(np.random.default_rng(7))
    dna = encode(weights, masks, EncodingConfig())
    plain = sample_offspring(dna, masks, env(0.3), 1, np.random.default_rng(8))
    guarded = sample_offspring(dna, masks, env(0.3), 1, np.random.default_rng(8), frozenset({"conv"}))
    np.testing.assert_array_equal(plain["ip"], guarded["ip"])
    assert living_clusters(guarded["conv"], "kernel").sum() == living_clusters(masks["conv"], "kernel").sum()


def test_probability_zero_never_survives_and_one_always_does() -> None:
    dna = {"fc": LayerDNA(np.array([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]]), None)}
    parent = {"fc": np.array([[True, True, False], [True, True, True]])}
    child = sample_offspring(dna, parent, env(1.0, "multiplier"), 1, np.random.default_rng(0))
    np.testing.assert_array_equal(child["fc"], [[False, True, False], [False, True, False]])


def test_sample_offspring_rejects_mismatched_input() -> None:
    dna = {"fc": LayerDNA(np.ones((2, 3)), None)}
    rng = np.random.default_rng(0)
    with pytest.raises(CaffeEvoError, match="no parent mask for layers: fc"):
        sample_offspring(dna, {"conv": np.ones((2, 3), bool)}, env(0.5), 1, rng)
    with pytest.raises(CaffeEvoError, match="layer 'fc': parent mask"):
        sample_offspring(dna, {"fc": np.ones((3, 2), bool)}, env(0.5), 1, rng)
    with pytest.raises(CaffeEvoError, match="layer 'fc': parent mask"):
        sample_offspring(dna, {"fc": np.ones((2, 3), np.uint8)}, env(0.5), 1, rng)


def test_evolving_some_layers_ignores_the_other_masks_and_protected_names() -> None:
    rng = np.random.default_rng(9)
    weights, masks = network(rng)
    dna = encode({"conv": weights["conv"]}, masks, EncodingConfig(), frozenset({"ip"}))
    assert list(dna) == ["conv"]
    assert list(sample_offspring(dna, masks, env(0.5), 1, rng, frozenset({"ip"}))) == ["conv"]
