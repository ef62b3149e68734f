"""The evolutionary synthesis loop: heredity, random mutation and natural selection over Caffe generations.

Generation g: the parent's synaptic strengths give its genetic encoding (:mod:`caffe_evo.encoding`);
K offspring masks are sampled from it under the environment (:mod:`caffe_evo.synthesis`); each offspring
is trained with Caffe's solver with its mask enforced (:mod:`caffe_evo.masking`); the fittest on the
validation set survives (:mod:`caffe_evo.selection`) and is the next parent. Everything lands in the
lineage folder (:mod:`caffe_evo.lineage`), and :func:`evolve` resumes from whatever is complete there.

Randomness: offspring g, attempt a, candidate k draws its mask from ``SeedSequence([seed, g, a, k])``
and trains with a Caffe seed derived from the same sequence, so a run is reproducible from its seed
and a resumed run ends with exactly the lineage of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import platform
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from caffe_evo import (
    atomic,
    baselines,
    batchnorm,
    dependency,
    executors,
    lineage,
    masking,
    netstats,
    selection,
)
from caffe_evo.caffe_env import caffe_pb2, load_caffe
from caffe_evo.deploy.measure import measure
from caffe_evo.encoding import EncodingConfig, LayerDNA, bias_mask, encode
from caffe_evo.errors import CaffeEvoError, SelectionExhausted
from caffe_evo.precision import check_choice
from caffe_evo.recipe import DEPLOY_FILE, SOLVER_FILE, TRAIN_VAL_FILE, Recipe, set_solver_fields
from caffe_evo.stress import StressConfig, StressSignal
from caffe_evo.synthesis import (
    Environment,
    Factor,
    check_mating,
    combine_parents,
    parse_schedule,
    sample_offspring,
)
from caffe_evo.training import (
    METRICS_FILE,
    SOLVERSTATE_FILE,
    WEIGHTS_FILE,
    TrainOptions,
    check_bn_batches,
    relocate,
    train,
)
from caffe_evo.weights import load_net

EVOLVABLE_TYPES = ("Convolution", "InnerProduct")
INIT_MODES = ("inherit", "reinit")
# What a resumed run may change: none of it changes the lineage so far.
RESUMABLE = ("generations", "measure", "allow_python_layers")
_PATHS = ("recipe", "data_root", "ancestor", "mask_source")
FACTOR_LEVELS = ("synapse", "cluster")


@dataclass
class EvolutionConfig:
    """Everything that defines a run; stored in ``run.json`` and reloaded by ``--resume``.

    Defaults: the cluster-driven encoding with the reading exp(|w|/Z - 1), Z = the layer's max |w|, the
    survival-rate environment met per layer (synapse 0.9, cluster 0.78), inherited weights fine-tuned with
    a learning rate falling linearly to 0, the dependency step, and a population of 2 offspring trained
    2,000 iterations each per generation: settings measured on LeNet-5/MNIST over 13 generations
    (``bench/RESULTS.md`` section 2, where the small convolutions get factors of their own,
    ``prototxt/lenet5/evolution.yaml``, chosen on validation accuracy). Some of these were chosen on test
    accuracy before issue 11 and are marked so there. The literal multiplier collapsed the network on
    this project's machines (METHOD.md), and re-initialised offspring lost to inherited ones.
    """

    recipe: str
    method: str = "evolution"  # or a baseline: "magnitude", "l1-filter", "retrain-mask" (caffe_evo.baselines)
    # baselines: the share of living synapses (magnitude) or kernels (l1-filter) removed per round
    prune_fraction: float = 0.3
    prune_scope: str = "layer"  # magnitude pruning threshold: per "layer" or "global"
    mask_source: str | None = None  # retrain-mask: the generation folder whose masks.npz is retrained
    generations: int = 13
    population: int = 2
    # m > 1: the m fittest candidates of a generation are the next one's parents (multi-parent synthesis)
    parents: int = 1
    mating: str = "mean"  # how the parents' probabilities combine (caffe_evo.synthesis.MATING_RULES)
    fitness_metric: str = "val_accuracy"  # the key of a candidate's metrics.json that selection maximises
    fitness_penalty: float = 0.0  # > 0: that much of the metric is lost per doubling of fitness_size
    fitness_size: str = "synapses"  # what the penalty counts: "synapses" | "clusters"
    seed: int = 0
    encoding: EncodingConfig = field(default_factory=EncodingConfig)
    synapse_factor: str = "0.9"  # a value in (0, 1], or a per-generation schedule "0.9,0.8,0.7"
    cluster_factor: str = "0.78"
    factor_mode: str = "survival"  # "survival": expected surviving fraction; "multiplier": literal F
    factor_scope: str = "layer"  # survival rate met in every "layer" or over the whole "network"
    size_exponent: float = 0.0  # > 0: smaller layers get a gentler factor, F ** ((n / n_max) ** g)
    # layer -> {"synapse"|"cluster": factor or schedule}: layers that meet a factor of their own
    layer_factors: dict[str, dict[str, str]] = field(default_factory=dict)
    init: str = "inherit"  # "inherit": fine-tune the surviving weights; "reinit": the layers' fillers
    iters_per_generation: int = 2000
    ancestor: str | None = None  # a `caffe-evo train` output folder; None = train one
    ancestor_iters: int | None = None  # None = the recipe's max_iter
    accuracy_floor: float | None = None  # absolute validation accuracy; None = ancestor's - max drop
    max_accuracy_drop: float = 0.03
    max_attempts: int = 3
    layers: list[str] | None = None  # layers that evolve; None = every Convolution and InnerProduct
    precision: str = "fp32"  # "fp16"/"bf16": restrict weights after each generation's training
    stress_level: str = "off"  # "synapse" | "cluster": StressedNets' training-time stress
    stress_strength: str = "0.0"  # attenuation s, or a per-generation schedule "0.5,0.2,0"
    stress_period: int = 10  # stress every k iterations
    measure: bool = True  # compact every generation and measure its cost and CPU speed
    drop_unread: bool = True  # offspring lose the synapses that cannot change the output (compaction)
    data_root: str | None = None
    allow_python_layers: bool = False
    stand_in: bool = False  # train on the recipe's stand-in dataset (its stand_in.yaml)
    # training batches for the exact re-estimation of BatchNorm statistics after every training run
    # (caffe_evo.batchnorm); 0 keeps Caffe's moving averages
    bn_batches: int = 50
    solver_overrides: dict[str, Any] = field(default_factory=dict)  # every training run (SolverParameter)
    # offspring training only, over solver_overrides: the learning rate falls linearly to 0 over the
    # generation's iterations, so each offspring is evaluated at a converged point, not mid-descent
    offspring_solver: dict[str, Any] = field(default_factory=lambda: {"lr_policy": "poly", "power": 1.0})

    def environment(self) -> Environment:
        def factor(text: str) -> Factor:
            return Factor.parse(str(text), self.factor_mode, self.factor_scope, self.size_exponent)

        check_layer_factors(self.layer_factors)
        own: dict[str, dict[str, Factor]] = {level: {} for level in FACTOR_LEVELS}
        for name, levels in self.layer_factors.items():
            for level, text in levels.items():
                own[level][name] = factor(text)
        return Environment(
            synapse=factor(self.synapse_factor),
            cluster=factor(self.cluster_factor),
            layer_synapse=own["synapse"],
            layer_cluster=own["cluster"],
        )

    def fitness(self) -> selection.Fitness:
        return selection.Fitness(self.fitness_metric, self.fitness_penalty, self.fitness_size)

    def stress(self) -> StressConfig:
        return StressConfig(
            self.stress_level, parse_schedule(self.stress_strength, "stress strength"), self.stress_period
        )

    def validate(self) -> None:
        """Refuse nonsense before anything is written."""
        if self.generations < 1:
            raise CaffeEvoError(f"--generations must be at least 1, got {self.generations}")
        if self.population < 1:
            raise CaffeEvoError(f"--population must be at least 1, got {self.population}")
        if not 1 <= self.parents <= self.population:
            raise CaffeEvoError(
                f"--parents must be between 1 and the population ({self.population}), got {self.parents}"
            )
        if self.parents > 1 and self.method != "evolution":
            raise CaffeEvoError(f"--parents {self.parents} needs --method evolution")
        check_mating(self.mating)
        self.fitness()
        if self.max_attempts < 1:
            raise CaffeEvoError(f"--max-attempts must be at least 1, got {self.max_attempts}")
        check_bn_batches(self.bn_batches)
        if self.iters_per_generation < 1:
            raise CaffeEvoError(f"--iters-per-generation must be positive, got {self.iters_per_generation}")
        if self.ancestor_iters is not None and self.ancestor_iters < 1:
            raise CaffeEvoError(f"--ancestor-iters must be positive, got {self.ancestor_iters}")
        if self.layers is not None and not self.layers:
            raise CaffeEvoError("--layers must name at least one layer (leave it out to evolve them all)")
        if self.method not in baselines.METHODS:
            raise CaffeEvoError(
                f"unknown --method {self.method!r}; choose from {', '.join(baselines.METHODS)}"
            )
        if not 0.0 < self.prune_fraction < 1.0:
            raise CaffeEvoError(f"--prune-fraction must be in (0, 1), got {self.prune_fraction}")
        if self.prune_scope not in baselines.SCOPES:
            raise CaffeEvoError(f"unknown --prune-scope {self.prune_scope!r}; choose from layer, global")
        if self.method == "retrain-mask":
            if self.mask_source is None or not (Path(self.mask_source) / lineage.MASKS_FILE).is_file():
                raise CaffeEvoError(
                    f"--method retrain-mask needs --mask-source GEN_DIR with {lineage.MASKS_FILE}"
                )
            if self.init != "reinit":
                raise CaffeEvoError(
                    "--method retrain-mask trains the architecture from scratch: use --init reinit"
                )
        if self.init not in INIT_MODES:
            raise CaffeEvoError(f"unknown --init {self.init!r}; choose from {', '.join(INIT_MODES)}")
        if self.accuracy_floor is not None and not 0.0 <= self.accuracy_floor <= 1.0:
            raise CaffeEvoError(f"--accuracy-floor must be in [0, 1], got {self.accuracy_floor}")
        if not 0.0 <= self.max_accuracy_drop <= 1.0:
            raise CaffeEvoError(f"--max-accuracy-drop must be in [0, 1], got {self.max_accuracy_drop}")
        self.environment()
        self.stress()
        for overrides in (self.solver_overrides, self.offspring_solver):
            set_solver_fields(caffe_pb2().SolverParameter(), overrides)
        check_choice(self.precision)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resumed(self, given: dict[str, Any]) -> EvolutionConfig:
        """This run's configuration with the options ``given`` to a resume (keys as in ``run.json``);
        only :data:`RESUMABLE` ones may differ, e.g. more generations extend the run."""
        new = EvolutionConfig.from_json(_merged(self.to_json(), given))

        def same(key: str) -> bool:
            old, value = getattr(self, key), getattr(new, key)
            if key in _PATHS and old and value:
                return Path(old).resolve() == Path(value).resolve()
            return old == value

        fixed = [f.name for f in dataclasses.fields(self) if f.name not in RESUMABLE and not same(f.name)]
        if fixed:
            raise CaffeEvoError(
                f"a resumed run cannot change {', '.join(fixed)} (they shape its lineage); only "
                f"{', '.join(RESUMABLE)} can change, or start a new run with --out"
            )
        return new

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EvolutionConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CaffeEvoError(f"unknown configuration keys: {', '.join(unknown)}")
        values = dict(data)
        encoding = check_mapping("encoding", values.get("encoding", {}))
        unknown = sorted(set(encoding) - {f.name for f in dataclasses.fields(EncodingConfig)})
        if unknown:
            raise CaffeEvoError(f"unknown encoding keys: {', '.join(unknown)}")
        values["encoding"] = EncodingConfig(**encoding)
        for key in ("synapse_factor", "cluster_factor", "stress_strength"):
            if key in values:
                values[key] = str(values[key])
        # A value of the wrong type from a config file would crash validation or the run, not fail it.
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in values and not _conforms(values[f.name], hints[f.name]):
                raise CaffeEvoError(f"configuration {f.name}: expected {f.type}, got {values[f.name]!r}")
        return cls(**values)

    def with_absolute_paths(self) -> EvolutionConfig:
        """This configuration with its paths resolved against the current folder, so that a run stored
        with them resumes from any folder."""
        paths = {key: str(Path(value).resolve()) for key in _PATHS if (value := getattr(self, key))}
        return dataclasses.replace(self, **paths)


def check_mapping(key: str, value: Any) -> dict[str, Any]:
    """``value``, which the configuration ``key`` needs to be a mapping."""
    if not isinstance(value, dict):
        raise CaffeEvoError(f"configuration {key}: expected a mapping, got {value!r}")
    return value


def check_layer_factors(layer_factors: Any) -> None:
    """Refuse layer factors that are not layer -> {"synapse"|"cluster": factor}."""
    if not isinstance(layer_factors, dict):
        raise CaffeEvoError(f"layer_factors must map layer names to levels, got {layer_factors!r}")
    for name, levels in layer_factors.items():
        if not isinstance(levels, dict) or not levels or set(levels) - set(FACTOR_LEVELS):
            raise CaffeEvoError(
                f"layer factor for '{name}' must give synapse and/or cluster factors, got {levels!r}"
            )


def _conforms(value: Any, hint: Any) -> bool:
    """Whether ``value`` has the annotated type ``hint``; an int does for a float. Of a container only the
    items of a list and the keys of a mapping are checked: the values have checks of their own."""
    if typing.get_origin(hint) is types.UnionType:
        return any(_conforms(value, arg) for arg in typing.get_args(hint))
    if hint is Any:
        return True
    if hint in (int, float) and isinstance(value, bool):
        return False
    if hint is float:
        return isinstance(value, int | float)
    origin = typing.get_origin(hint)
    if origin is None:
        return isinstance(value, hint)
    first = typing.get_args(hint)[0]
    if origin is list:
        return isinstance(value, list) and all(_conforms(item, first) for item in value)
    return isinstance(value, origin) and all(_conforms(key, first) for key in value)


def _merged(base: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``given`` over it, nested mappings (encoding, layer factors) merged key by key."""
    merged = dict(base)
    for key, value in given.items():
        old = merged.get(key)
        merged[key] = _merged(old, value) if isinstance(old, dict) and isinstance(value, dict) else value
    return merged


@dataclass
class Parent:
    """What a generation needs from its parent, or from the several parents one stands for."""

    generation: int
    folder: Path  # a training folder of this architecture (its deploy.prototxt)
    params: dict[str, list[np.ndarray]]  # layer -> [weights, bias] as stored (fp32)
    masks: dict[str, np.ndarray]  # evolvable layer -> bool synapse mask
    sources: list[str]  # the parents' folders, relative to the run, fittest first
    # standing for several parents: the fittest one's masks, which the survival rate is met against, so
    # that an offspring drawn from the union of their masks shrinks as fast as one parent's would
    fittest_masks: dict[str, np.ndarray] | None = None

    @classmethod
    def mate(cls, parents: list[Parent], deploy: Any = None) -> Parent:
        """One parent standing for parents of one ancestor: the union of their masks (a synapse dead in
        every parent stays dead) and each living parameter from the fittest parent in which it lives.

        A map that lives only in a later parent brings along its BatchNorm and Scale parameters (the
        followers in the NetParameter ``deploy``; None: a net without any), which are 0 in the parents
        where it is dead: Scale's as they are, BatchNorm's statistics rescaled to the fittest parent's
        stored scale factor, by which Caffe divides them."""
        first = parents[0]
        params = {name: [blob.copy() for blob in blobs] for name, blobs in first.params.items()}
        masks = {name: mask.copy() for name, mask in first.masks.items()}
        chains = masking.followers(deploy) if deploy is not None else {}
        for other in parents[1:]:
            for name, mask in masks.items():
                gained = other.masks[name] & ~mask
                blobs = params[name]
                blobs[0][gained] = other.params[name][0][gained]
                gained_bias = bias_mask(other.masks[name]) & ~bias_mask(mask)
                for blob, source in zip(blobs[1:], other.params[name][1:], strict=True):
                    blob[gained_bias] = source[gained_bias]
                for layer, kind in chains.get(name, []):
                    _inherit_channels(params[layer], other.params[layer], gained_bias, kind)
                mask |= other.masks[name]
        sources = [s for p in parents for s in p.sources]
        fittest = first.masks if len(parents) > 1 else None
        return cls(first.generation, first.folder, params, masks, sources, fittest)

    def of_layers(self, names: list[str]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Weights and masks of the named layers, in that order."""
        return {name: self.params[name][0] for name in names}, {name: self.masks[name] for name in names}


def _inherit_channels(
    blobs: list[np.ndarray], source: list[np.ndarray], channels: np.ndarray, kind: str
) -> None:
    """Copy the ``channels`` of a BatchNorm or Scale layer's ``source`` blobs into ``blobs`` in place."""
    if kind != "BatchNorm":
        for blob, given in zip(blobs, source, strict=True):
            blob[channels] = given[channels]
        return
    # Caffe uses stored sum / stored factor; a source factor of 0 means statistics of 0
    factor = float(source[2][0])
    ratio = float(blobs[2][0]) / factor if factor != 0 else 0.0
    for blob, given in zip(blobs[:2], source[:2], strict=True):
        blob[channels] = given[channels] * ratio


def evolvable_layers(recipe: Recipe, selected: list[str] | None) -> tuple[list[str], frozenset[str]]:
    """All Convolution/InnerProduct layers in net order, and the protected ones: the net's output layers
    (:func:`caffe_evo.dependency.output_layers`), which never lose an output."""
    layers = [layer.name for layer in recipe.deploy.layer if layer.type in EVOLVABLE_TYPES]
    if not layers:
        raise CaffeEvoError(f"recipe {recipe.name}: no Convolution or InnerProduct layer to evolve")
    if selected is not None:
        unknown = [name for name in selected if name not in layers]
        if unknown:
            raise CaffeEvoError(
                f"recipe {recipe.name}: cannot evolve {', '.join(unknown)}; evolvable: {', '.join(layers)}"
            )
    return layers, dependency.output_layers(recipe.deploy)


def read_params(deploy: Path, weights: Path) -> dict[str, list[np.ndarray]]:
    """Every learnable blob of ``weights`` (loaded through pycaffe with ``deploy``) as numpy copies."""
    caffe = load_caffe()
    net = caffe.Net(str(deploy), str(weights), caffe.TEST)
    return {name: [blob.data.copy() for blob in blobs] for name, blobs in net.params.items()}


def offspring_init(
    parent: Parent, masks: dict[str, np.ndarray], init: str
) -> dict[str, list[np.ndarray]] | None:
    """Inherited, masked weights (heredity; from :meth:`Parent.mate` for several parents) or None (the
    recipe's fillers, masked by the trainer)."""
    if init == "reinit":
        return None
    inherited = {}
    for name, blobs in parent.params.items():
        if name in masks:
            keep = masks[name]
            blobs = [blobs[0] * keep, *(b * bias_mask(keep) for b in blobs[1:])]
        inherited[name] = blobs
    return inherited


@dataclass
class CandidateSeeds:
    """The independent random streams of one offspring, all from ``SeedSequence([seed, g, a, k])``."""

    mask: np.random.Generator
    caffe: int
    stress: np.random.Generator

    @classmethod
    def of(cls, seed: int, generation: int, attempt: int, candidate: int) -> CandidateSeeds:
        mask_seq, caffe_seq, stress_seq = np.random.SeedSequence(
            [seed, generation, attempt, candidate]
        ).spawn(3)
        caffe_seed = int(caffe_seq.generate_state(1)[0] & 0x7FFFFFFF)
        return cls(np.random.default_rng(mask_seq), caffe_seed, np.random.default_rng(stress_seq))


def _versions() -> dict[str, str]:
    import caffe_evo

    caffe = load_caffe()
    return {
        "caffe_evo": caffe_evo.__version__,
        "caffe": caffe.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


class Evolution:
    """One run folder; :meth:`run` carries it from wherever it stands to its last generation."""

    def __init__(
        self,
        config: EvolutionConfig,
        run: Path,
        progress: bool = True,
        executor: executors.ExecutorOptions | None = None,
    ) -> None:
        config.validate()
        self.executor = executor or executors.ExecutorOptions()
        self.executor.validate()
        self.config = config
        self.run_dir = Path(run).resolve()
        self.progress = progress
        self.fitness = config.fitness()
        self._breeding: dict[int, tuple[Parent, dict[str, LayerDNA]]] = {}  # generation -> parent, DNA
        self._pool: executors.Executor | None = None  # while run() runs
        data_root = Path(config.data_root) if config.data_root else None
        self.recipe = Recipe.load(Path(config.recipe), data_root, config.allow_python_layers, config.stand_in)
        self.layers, self.protected = evolvable_layers(self.recipe, config.layers)
        self._check_recipe()
        self.evolving = self.layers if config.layers is None else config.layers
        unknown = sorted(set(config.layer_factors) - set(self.evolving))
        if unknown:
            raise CaffeEvoError(
                f"layer factors for {', '.join(unknown)}, which do not evolve; "
                f"evolving: {', '.join(self.evolving)}"
            )
        self.environment = config.environment()
        self.granularity = config.encoding.granularity
        # Eltwise-tied maps live or die by one draw (cluster level, kernel granularity)
        self.ties: dict[str, np.ndarray] = {}
        if config.encoding.level == "cluster" and self.granularity == "kernel":
            self.ties = dependency.tied_channels(self.recipe.folder / DEPLOY_FILE, self.evolving)

    def _check_recipe(self) -> None:
        """Refuse here what would otherwise fail only after the ancestor has trained."""
        names = self.recipe.test_net_names()
        if "val" not in names:
            raise CaffeEvoError(
                f"recipe {self.recipe.name}: its solver has no test net of stage val (evolution selects on "
                "the validation split, held out of training; the test set is only reported)"
            )
        if "test" not in names:
            raise CaffeEvoError(
                f"recipe {self.recipe.name}: its solver has no test net of stage test (every generation "
                "reports its test-set score beside the validation score it was selected on)"
            )
        if self.config.measure or self.config.drop_unread:
            try:
                dependency.check_follows(self.recipe.folder / DEPLOY_FILE)
            except CaffeEvoError as exc:
                raise CaffeEvoError(
                    f"{exc}; evolve it with --no-measure --keep-unread (no compaction, no dependency step)"
                ) from None

    # -- the ancestor -------------------------------------------------------------------------------------

    def _ancestor(self) -> dict[str, Any]:
        gen_dir = lineage.generation_dir(self.run_dir, 0)
        if (gen_dir / METRICS_FILE).is_file():
            return lineage.read_json(gen_dir / METRICS_FILE)
        # Trained into a candidate folder of its own, so that what follows (measuring it) cannot lose it.
        source = Path(self.config.ancestor or lineage.candidate_dir(self.run_dir, 0, 0, 0))
        if self.config.ancestor is None and not (source / METRICS_FILE).is_file():
            options = TrainOptions(
                max_iter=self.config.ancestor_iters,
                seed=self.config.seed,
                precision=self.config.precision,
                solver_overrides=self.config.solver_overrides,
                bn_batches=self.config.bn_batches,
                progress=self.progress,
            )
            train(self.recipe, source, options)
        with atomic.atomic_path(gen_dir, directory=True) as work:
            relocate(source, work, gen_dir)
            metrics = self._finalize_ancestor(work, lineage.read_json(source / METRICS_FILE))
            atomic.write_json(work / METRICS_FILE, metrics)
        return metrics

    def _finalize_ancestor(self, folder: Path, metrics: dict[str, Any]) -> dict[str, Any]:
        params = read_params(folder / DEPLOY_FILE, folder / WEIGHTS_FILE)
        masks = {name: params[name][0] != 0 for name in self.layers}
        masking.save(folder / lineage.MASKS_FILE, masks)
        counts = netstats.totals(netstats.layer_counts(masks, self.granularity))
        return {
            **metrics,
            **self._cost(folder, masks),
            **netstats.efficiency_report(masks, counts, self.granularity),
            "generation": 0,
            "ancestor_synapses": counts["synapses"],
            "ancestor_clusters": counts["clusters"],
        }

    def _check_ancestor_source(self) -> None:
        if self.config.ancestor is None:
            return
        source = Path(self.config.ancestor)
        for name in (WEIGHTS_FILE, SOLVERSTATE_FILE, METRICS_FILE, DEPLOY_FILE, SOLVER_FILE, TRAIN_VAL_FILE):
            if not (source / name).is_file():
                raise CaffeEvoError(f"--ancestor {source}: no {name} (expected a `caffe-evo train` output)")
        load_net(self.recipe.folder / DEPLOY_FILE, source / WEIGHTS_FILE)  # one line for any mismatch

    def _cost(self, folder: Path, masks: dict[str, np.ndarray]) -> dict[str, Any]:
        if not self.config.measure:
            return {}
        # Compaction writes through Caffe's Net.save, which aborts the process on an I/O error.
        atomic.check_space(folder, 4 * (folder / WEIGHTS_FILE).stat().st_size + 2**20)
        try:
            return {"cost": measure(folder, masks, precision=self.config.precision)}
        except CaffeEvoError as exc:
            raise CaffeEvoError(
                f"{exc}; the trained networks are kept in {self.run_dir / 'candidates'}: "
                f"`caffe-evo evolve --resume {self.run_dir} --no-measure` goes on without measuring"
            ) from None

    # -- one generation -----------------------------------------------------------------------------------

    def _stress_signal(
        self, generation: int, masks: dict[str, np.ndarray], rng: np.random.Generator
    ) -> StressSignal | None:
        stress = self.config.stress()
        if not stress.active:
            return None
        evolving = {name: masks[name] for name in self.evolving}
        return StressSignal(
            stress,
            self.config.encoding,
            self.environment,
            generation,
            evolving,
            self.protected,
            rng,
            self.ties,
        )

    def _load_parent(self, folder: Path, generation: int) -> Parent:
        params = read_params(folder / DEPLOY_FILE, folder / WEIGHTS_FILE)
        masks = masking.load(folder / lineage.MASKS_FILE)
        return Parent(generation, folder, params, masks, [str(folder.relative_to(self.run_dir))])

    def _parents(self, generation: int) -> list[Parent]:
        """The survivors of ``generation``, fittest first: its folder, then the other kept candidates."""
        gen_dir = lineage.generation_dir(self.run_dir, generation)
        parents = [self._load_parent(gen_dir, generation)]
        if generation > 0:
            survivors = lineage.read_json(gen_dir / METRICS_FILE)["selection"].get("survivors", [])
            for attempt, k in survivors[1 : self.config.parents]:
                folder = lineage.candidate_dir(self.run_dir, generation, attempt, k)
                parents.append(self._load_parent(folder, generation))
        return parents

    def _encode(self, parent: Parent) -> dict[str, LayerDNA]:
        weights, masks = parent.of_layers(self.evolving)
        if self.config.encoding.strength == "bn_folded":
            weights = batchnorm.folded_weights(weights, parent.params, self.recipe.deploy)
        return encode(weights, masks, self.config.encoding, self.protected)

    def _breed(self, generation: int) -> tuple[Parent, dict[str, LayerDNA]]:
        """Offspring ``generation``'s parent (standing for all its parents) and DNA, computed once."""
        if generation not in self._breeding:
            parents = self._parents(generation - 1)
            dna: dict[str, LayerDNA] = {}
            if self.config.method == "evolution":
                dnas = [self._encode(p) for p in parents]
                if len(parents) == 1:
                    dna = dnas[0]
                else:
                    dna = combine_parents(
                        dnas, [p.of_layers(self.evolving)[1] for p in parents], self.config.mating
                    )
            # older generations are done
            self._breeding = {generation: (Parent.mate(parents, self.recipe.deploy), dna)}
        return self._breeding[generation]

    def candidate(self, generation: int, attempt: int, k: int) -> dict[str, Any]:
        """Train offspring ``generation``, attempt ``attempt``, candidate ``k`` (unless done); its metrics.

        Everything it needs comes from the lineage on disk, so any process may run it.
        """
        folder = lineage.candidate_dir(self.run_dir, generation, attempt, k)
        if (folder / METRICS_FILE).is_file():
            return lineage.read_json(folder / METRICS_FILE)
        parent, dna = self._breed(generation)
        ancestor = lineage.read_json(lineage.generation_dir(self.run_dir, 0) / METRICS_FILE)
        seeds = CandidateSeeds.of(self.config.seed, generation, attempt, k)
        proposed = self._propose(parent, dna, generation, seeds.mask)
        if self.config.drop_unread:
            deploy = parent.folder / DEPLOY_FILE
            # BatchNorm/Scale of the maps that die now are masked as the offspring's training masks them
            whole = {name: proposed.get(name, parent.masks[name]) for name in self.layers}
            params = masking.masked_params(parent.params, whole, self.recipe.deploy)
            proposed = dependency.drop_unread(deploy, params, proposed, self.protected, parent.masks)
        masks = {name: proposed.get(name, parent.masks[name]) for name in self.layers}
        options = TrainOptions(
            max_iter=self.config.iters_per_generation,
            seed=seeds.caffe,
            init_params=offspring_init(parent, masks, self.config.init),
            weight_masks=masks,
            precision=self.config.precision,
            stress=self._stress_signal(generation, masks, seeds.stress),
            solver_overrides={**self.config.solver_overrides, **self.config.offspring_solver},
            bn_batches=self.config.bn_batches,
            progress=self.progress,
        )
        ancestor_counts = {
            "synapses": ancestor["ancestor_synapses"],
            "clusters": ancestor["ancestor_clusters"],
        }

        layer_own = (("synapse", self.environment.layer_synapse), ("cluster", self.environment.layer_cluster))

        def finalize(work: Path, metrics: dict[str, Any]) -> dict[str, Any]:
            masking.save(work / lineage.MASKS_FILE, masks)
            return {
                **metrics,
                **netstats.efficiency_report(masks, ancestor_counts, self.granularity),
                "generation": generation,
                "attempt": attempt,
                "candidate": k,
                "parent_generation": parent.generation,
                "parents": parent.sources,
                "mask_seed": [self.config.seed, generation, attempt, k],
                "environment": {
                    "synapse": self.environment.synapse.at(generation),
                    "cluster": self.environment.cluster.at(generation),
                    "mode": self.config.factor_mode,
                    "scope": self.config.factor_scope,
                    "size_exponent": self.config.size_exponent,
                    "layers": {
                        name: {level: own[name].at(generation) for level, own in layer_own if name in own}
                        for name in self.config.layer_factors
                    },
                },
            }

        return train(self.recipe, folder, options, finalize=finalize)

    def _propose(
        self, parent: Parent, dna: dict[str, LayerDNA], generation: int, rng: np.random.Generator
    ) -> dict[str, np.ndarray]:
        """The offspring's masks of the evolving layers, by the configured method."""
        weights, masks = parent.of_layers(self.evolving)
        method = self.config.method
        if method == "evolution":
            return sample_offspring(
                dna, masks, self.environment, generation, rng, self.protected, self.ties, parent.fittest_masks
            )
        if method == "magnitude":
            return baselines.magnitude_masks(
                weights, masks, self.config.prune_fraction, self.config.prune_scope, self.protected
            )
        if method == "l1-filter":
            if generation > 1:  # one-shot: later generations only fine-tune
                return masks
            return baselines.l1_filter_masks(weights, masks, self.config.prune_fraction, self.protected)
        source = masking.load(Path(self.config.mask_source) / lineage.MASKS_FILE)
        missing = [name for name in masks if name not in source or source[name].shape != masks[name].shape]
        if missing:
            raise CaffeEvoError(
                f"--mask-source {self.config.mask_source}: no matching mask for {', '.join(missing)}"
            )
        return {name: source[name] & masks[name] for name in masks}

    def _generation(self, generation: int, floor: float) -> dict[str, Any]:
        tried: list[dict[str, Any]] = []
        for attempt in range(self.config.max_attempts):
            tasks = [
                CandidateTask(str(self.run_dir), generation, attempt, k)
                for k in range(self.config.population)
            ]
            assert self._pool is not None
            desc = f"gen {generation} attempt {attempt}"
            with tqdm(total=len(tasks), desc=desc, disable=not self.progress) as bar:
                tried += self._pool.map(train_candidate, tasks, functools.partial(_show_running, bar))
            survivors = self.fitness.rank(tried, floor)[: self.config.parents]
            if survivors:
                break
        else:
            best = max(self.fitness.value(c) for c in tried)
            raise SelectionExhausted(
                f"generation {generation}: no offspring reached the {self.fitness.metric} floor {floor:.4f} "
                f"in {self.config.max_attempts} attempts (best {best:.4f}); lineage kept up to generation "
                f"{generation - 1} in {self.run_dir}"
            )
        winner = survivors[0]
        source = lineage.candidate_dir(self.run_dir, generation, winner["attempt"], winner["candidate"])
        gen_dir = lineage.generation_dir(self.run_dir, generation)
        metrics = {**winner, "selection": self.fitness.summary(tried, survivors, floor)}
        with atomic.atomic_path(gen_dir, directory=True) as work:
            relocate(source, work, gen_dir)
            # Timed here, after every candidate's training, so that no concurrent training skews it.
            metrics.update(self._cost(work, masking.load(work / lineage.MASKS_FILE)))
            atomic.write_json(work / METRICS_FILE, metrics)
        return metrics

    # -- the run ------------------------------------------------------------------------------------------

    def run(self, on_generation: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
        """Carry the run to its last generation; returns every generation's metrics."""
        run_file = self.run_dir / lineage.RUN_FILE
        if not run_file.is_file():
            self._check_ancestor_source()
        # Before anything is written or trained, so that an unreachable cluster costs nothing.
        self._pool = executors.make(self.executor)
        try:
            with atomic.exclusive(self.run_dir, "the run"):
                if not run_file.is_file():
                    atomic.write_json(run_file, {"config": self.config.to_json(), "versions": _versions()})
                return self._run(on_generation)
        finally:
            self._pool.close()
            self._pool = None

    def _run(self, on_generation: Callable[[dict[str, Any]], None] | None) -> list[dict[str, Any]]:
        ancestor = self._ancestor()
        floor = self.config.accuracy_floor
        if floor is None:
            floor = self.fitness.value(ancestor) - self.config.max_accuracy_drop
        history = [ancestor]
        if on_generation is not None:
            on_generation(ancestor)
        for generation in range(1, self.config.generations + 1):
            gen_file = lineage.generation_dir(self.run_dir, generation) / METRICS_FILE
            if gen_file.is_file():
                metrics = lineage.read_json(gen_file)
            else:
                metrics = self._generation(generation, floor)
            history.append(metrics)
            if on_generation is not None:
                on_generation(metrics)
        return history


@dataclass(frozen=True)
class CandidateTask:
    """One offspring to train, as sent to a worker: the run folder and its coordinates."""

    run: str
    generation: int
    attempt: int
    candidate: int

    def __str__(self) -> str:
        return f"candidate a{self.attempt}_c{self.candidate} of generation {self.generation}"


def _show_running(bar: tqdm, running: list[CandidateTask], done: int) -> None:
    bar.update(done - bar.n)
    bar.set_postfix_str("training " + ", ".join(f"c{t.candidate}" for t in running) if running else "")


_worker_runs: dict[str, Evolution] = {}  # a worker's runs, each loaded once (recipe, parents, DNA)


def train_candidate(task: CandidateTask) -> dict[str, Any]:
    """A worker's entry: train the candidate from what the lineage on disk holds; its metrics."""
    if task.run not in _worker_runs:
        stored = lineage.read_run(Path(task.run))
        _worker_runs[task.run] = Evolution(EvolutionConfig.from_json(stored["config"]), Path(task.run), False)
    return _worker_runs[task.run].candidate(task.generation, task.attempt, task.candidate)


def start(
    config: EvolutionConfig,
    run: Path,
    progress: bool = True,
    executor: executors.ExecutorOptions | None = None,
) -> Evolution:
    """A new run in the folder ``run``, which must not exist yet (nothing is written on bad input)."""
    run = Path(run)
    if run.exists():
        raise CaffeEvoError(f"{run}: already exists; use --resume {run} to continue it")
    return Evolution(config.with_absolute_paths(), run, progress, executor)


def resume(
    run: Path,
    progress: bool = True,
    executor: executors.ExecutorOptions | None = None,
    changes: dict[str, Any] | None = None,
) -> Evolution:
    """The run in ``run``, reconfigured from its ``run.json``; the executor may differ from its start, and
    ``changes`` (:meth:`EvolutionConfig.resumed`) are stored in ``run.json`` for the resumes after it."""
    run = Path(run)
    stored = lineage.read_run(run)
    config = EvolutionConfig.from_json(stored["config"]).resumed(changes or {})
    evolution = Evolution(config, run, progress, executor)
    if config.to_json() != stored["config"]:
        with atomic.exclusive(run, "the run"):
            atomic.write_json(run / lineage.RUN_FILE, {**stored, "config": config.to_json()})
    return evolution
