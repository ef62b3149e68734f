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
