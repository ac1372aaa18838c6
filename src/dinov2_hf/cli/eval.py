"""``dinov2-hf eval TASK``: the DINOv2 frozen-feature protocols from the command line.

Inputs are validated (model path, dataset, columns, task options) before any weights are loaded or
features extracted; results are printed and written as JSON (``--output``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..data.shutdown import arrow_threads_finish

CLASSIFICATION_TASKS = ("knn", "linear", "logreg")
RETRIEVAL_TASKS = ("retrieval", "copydetect")
DENSE_TASKS = ("segmentation", "depth")
TASKS = CLASSIFICATION_TASKS + RETRIEVAL_TASKS + DENSE_TASKS + ("visualize",)


def add_eval_parser(subparsers) -> None:
    """Register the ``eval`` subcommand on the ``dinov2-hf`` parser."""
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a backbone on frozen features (kNN, linear, logreg, retrieval, copy detection, segmentation, depth, figures)",
        description="Frozen-feature evaluation with the DINOv2 protocols. Data: a folder of images, parquet or "
        "webdataset shards (file, folder or glob) or a Hub dataset id, read with `datasets`.",
    )
    parser.add_argument("task", choices=TASKS, help="evaluation protocol")
    model = parser.add_argument_group("model")
    model.add_argument("--model", help="checkpoint folder (ours or stock transformers), Meta .pth or Hub id; "
                       "default: a randomly initialised --preset (a baseline)")
    model.add_argument("--preset", default="vits14", help="architecture when --model is not given (default vits14)")
    model.add_argument("--seed", type=int, default=0, help="seed for random models, splits and heads (default 0)")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", help="training (database) images: folder, parquet/tar file or glob, Hub id")
    data.add_argument("--split", default="train", help="split of --dataset (default train)")
    data.add_argument("--test-dataset", help="test (query) images; default: --dataset")
    data.add_argument("--test-split", default="test", help="split of the test data (default test)")
    data.add_argument("--image-column", default="image")
    data.add_argument("--label-column", default="label")
    data.add_argument("--max-train", type=int, help="use at most this many training images")
    data.add_argument("--max-test", type=int, help="use at most this many test images")
    data.add_argument("--max-image-pixels", type=int, help="skip (and count) images larger than this many pixels "
                      "(default 178956970, dinov2_hf.data.decode.MAX_IMAGE_PIXELS)")
    run = parser.add_argument_group("features")
    run.add_argument("--batch-size", type=int, default=64)
    # 256 is modeling.processor.resize_for_crop(224), written out so that parsing imports no torch; it does not
    # follow --crop-size (a larger crop alone is refused below rather than resized differently)
    run.add_argument("--resize-size", type=int, default=256, help="shortest edge before the center crop (default 256)")
    run.add_argument("--crop-size", type=int, default=224, help="center crop (default 224)")
    run.add_argument("--num-workers", type=int, default=0, help="DataLoader workers decoding and preprocessing (default 0: "
                     "in process; use several to feed a GPU)")
    run.add_argument("--device", help="default: cuda when available, else cpu (bf16 autocast on cuda)")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    task = parser.add_argument_group("task options")
    task.add_argument("--ks", type=int, nargs="+", default=[10, 20, 100, 200], help="knn: k values")
    task.add_argument("--temperature", type=float, default=0.07, help="knn: vote temperature")
    task.add_argument("--epochs", type=int, default=10, help="linear, segmentation, depth: epochs of head training")
    task.add_argument("--val-fraction", type=float, default=0.1, help="linear/logreg: validation split of the training set")
    task.add_argument("--c-values", type=float, nargs="+", help="logreg: C sweep (default 1e-6..1e5, 12 values)")
    task.add_argument("--ground-truth", help="retrieval: JSON list, one entry per query: {easy, hard, junk} or {ok, junk} "
                      "database indices")
    task.add_argument("--ap", choices=["oxford", "standard"], default="oxford", help="retrieval: AP definition (default oxford)")
    task.add_argument("--mask-column", default="annotation", help="segmentation: class-index map column (default annotation)")
    task.add_argument("--num-classes", type=int, help="segmentation: number of classes (required)")
    task.add_argument("--reduce-zero-label", action="store_true", help="segmentation: class 0 is 'other' (ignored), as ADE20K")
    task.add_argument("--depth-column", default="depth_map", help="depth: depth map column (default depth_map)")
    task.add_argument("--depth-scale", type=float, default=1.0, help="depth: divide stored depths by this (1000 for mm PNGs)")
    task.add_argument("--lr", type=float, default=1e-2, help="segmentation/depth: head learning rate (AdamW)")
    task.add_argument("--images", nargs="+", default=["china.jpg", "flower.jpg"],
                      help="visualize: image files or built-in samples (china.jpg, flower.jpg)")
    task.add_argument("--output-dir", default="figures", help="visualize: folder for the PNGs (default figures)")
    task.add_argument("--num-queries", type=int, help="copydetect: augmented copies used as queries (default: 1000 or the database size)")
    parser.add_argument("--output", default="results.json", help="JSON results file (default results.json)")
    parser.add_argument("--model-card", help="also add the headline metrics to this model card's model-index "
                        "(e.g. MODEL_DIR/README.md; created if missing)")
    parser.add_argument("--dataset-name", help="dataset name for the model-index (default: the --dataset path)")
    parser.set_defaults(func=run_eval)


def _check_args(args: argparse.Namespace) -> None:
    """Fail on bad arguments before anything is loaded."""
    from ..data.sources import load_image_stream
    from ..modeling.loading import check_backbone_source

    if args.model:
        check_backbone_source(args.model, "--model ")
    for flag in ("max_train", "max_test", "batch_size", "max_image_pixels"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be a positive integer; got {value}.")
    if args.crop_size > args.resize_size:
        raise ValueError(f"--crop-size {args.crop_size} is larger than --resize-size {args.resize_size}.")
    if args.task == "visualize":
        from ..data.decode import load_image

        for name in args.images:
            load_image(name)  # raises FileNotFoundError naming the image
        return
    if not args.dataset:
        raise ValueError(f"{args.task} needs --dataset (a folder, parquet/tar file or glob, or Hub dataset id).")
    local = Path(args.dataset).exists() or any(ch in args.dataset for ch in "*?[")
    if local and not args.test_dataset and args.task in CLASSIFICATION_TASKS + DENSE_TASKS:
        # Local files carry no split names: the "test" split would be the training files again.
        raise ValueError(f"{args.task} on local files needs --test-dataset (e.g. .../test-*.parquet) besides --dataset; "
                         "a local --dataset has no separate test split.")
    if args.task == "segmentation" and not args.num_classes:
        raise ValueError("segmentation needs --num-classes (e.g. 150 for ADE20K with --reduce-zero-label).")
    if args.task == "retrieval":
        if not args.ground_truth or not Path(args.ground_truth).is_file():
            raise FileNotFoundError(f"retrieval needs --ground-truth FILE (JSON, one entry per query); got {args.ground_truth!r}.")
        ground_truth = json.loads(Path(args.ground_truth).read_text())
        if not isinstance(ground_truth, list) or not all(isinstance(g, dict) for g in ground_truth):
            raise ValueError(f"{args.ground_truth}: expected a JSON list of {{\"easy\", \"hard\", \"junk\"}} or {{\"ok\", \"junk\"}} objects.")
    if args.task == "copydetect" and None not in (args.max_train, args.num_queries) and args.num_queries > args.max_train:
        raise ValueError(f"--num-queries {args.num_queries} exceeds the database size --max-train {args.max_train}.")
    for test in (False, True) if args.task != "copydetect" else (False,):
        settings = _settings(args, test)
        if args.task in CLASSIFICATION_TASKS and not settings.label_column:
            raise ValueError(f"{args.task} needs labels: pass the label column of {settings.source!r} (--label-column).")
        stream = load_image_stream(settings, keys=_keys(args, test))  # cheap: opens the stream, checks files and columns
        if args.task in DENSE_TASKS:
            flag, column = ("--mask-column", args.mask_column) if args.task == "segmentation" else ("--depth-column", args.depth_column)
            if stream.column_names and column not in stream.column_names:
                raise ValueError(f"{flag} {column!r} is not a column of {settings.source!r}; columns: {stream.column_names}.")


def _keys(args: argparse.Namespace, test: bool):
    """Source errors name eval's own flags, not the trainer's ``data.*`` keys."""
    from ..data.sources import SourceKeys

    return SourceKeys(
        source="--test-dataset" if test and args.test_dataset else "--dataset",
        split="--test-split" if test else "--split",
        image_column="--image-column", label_column="--label-column", max_image_pixels="--max-image-pixels",
    )


def _settings(args: argparse.Namespace, test: bool):
    from ..data.sources import DataSettings

    return DataSettings(
        source=(args.test_dataset or args.dataset) if test else args.dataset,
        split=args.test_split if test else args.split,
        image_column=args.image_column,
        label_column=(args.label_column or None) if args.task in CLASSIFICATION_TASKS else None,
        **({} if args.max_image_pixels is None else {"max_image_pixels": args.max_image_pixels}),
    )


@arrow_threads_finish()  # datasets' waits for Arrow threads: once, at exit
def run_eval(args: argparse.Namespace) -> dict:
    """Run one evaluation task from parsed arguments; prints the metrics and writes ``args.output``."""
    import torch

    from ..eval.features import dataset_features
    from ..eval.results import write_results
    from ..modeling.loading import load_backbone
    from ..modeling.processor import dinov2_image_processor

    _check_args(args)
    torch.manual_seed(args.seed)  # a random --preset baseline is the same model every run
    model, description = load_backbone(args.model, args.preset)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    processor = dinov2_image_processor(crop_size=args.crop_size, resize_size=args.resize_size)
    common = dict(processor=processor, batch_size=args.batch_size, device=device, progress=not args.no_progress,
                  n_last_blocks=4 if args.task == "linear" else 1)
    if args.task == "visualize":
        return _visualize(args, model, description)
    if args.task in DENSE_TASKS:
        metrics, counts = _dense(args, model, device)
    elif args.task == "copydetect":
        metrics, counts = _copy_detection(args, model, common)
    else:
        train = dataset_features(model, _settings(args, test=False), max_images=args.max_train, num_workers=args.num_workers,
                                 require_labels=args.task in CLASSIFICATION_TASKS, **common)
        test = dataset_features(model, _settings(args, test=True), max_images=args.max_test, num_workers=args.num_workers,
                                require_labels=args.task in CLASSIFICATION_TASKS, **common)
        metrics = _run_task(args, train, test, device)
        counts = {"train_images": len(train), "test_images": len(test), "skipped_images": train.skipped + test.skipped}
    record = write_results(
        args.output, args.task, metrics, model=description,
        dataset={"train": f"{args.dataset} [{args.split}]", "test": f"{args.test_dataset or args.dataset} [{args.test_split}]", **counts},
        preprocessing={"resize": args.resize_size, "crop": args.crop_size},
    )
    skipped = f" ({counts['skipped_images']} undecodable or oversized images skipped)" if counts.get("skipped_images") else ""
    print(f"{args.task} on {counts['train_images']} train / {counts['test_images']} test images{skipped}, model {description}")
    for key, value in _headline(args.task, metrics).items():
        print(f"  {key}: {value:.4f}")
    if args.task == "linear":
        print(f"  best head: {metrics['best']['head']}")
    print(f"results written to {args.output}")
    if args.model_card:
        from ..eval.results import update_model_card

        update_model_card(args.model_card, [record], model_name=description, dataset_name=args.dataset_name)
        print(f"model-index updated in {args.model_card}")
    return record


def _visualize(args: argparse.Namespace, model, description: str) -> dict:
    from ..data.decode import load_image
    from ..eval.visualize import save_figures

    written = save_figures(model, [load_image(name) for name in args.images], args.output_dir, size=args.crop_size)
    record = {"task": "visualize", "model": description, "images": args.images,
              "figures": {kind: [str(path) for path in paths] for kind, paths in written.items()}}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(record, indent=2))
    print(f"visualize {len(args.images)} images, model {description}")
    for kind, paths in written.items():
        print(f"  {kind}: {', '.join(path.name for path in paths) or '-'}")
    print(f"figures written to {args.output_dir}")
    return record


def _dense(args: argparse.Namespace, model, device: str) -> tuple[dict, dict]:
    """Linear segmentation / depth head on the last block's patch tokens of square-resized images."""
    from ..data.sources import load_image_stream
    from ..eval.dense import (
        HeadTraining,
        depth_metrics,
        load_dense_split,
        patch_feature_maps,
        predict,
        segmentation_metrics,
        to_pixel_values,
        train_depth_head,
        train_segmentation_head,
    )

    kind, column = ("mask", args.mask_column) if args.task == "segmentation" else ("depth", args.depth_column)
    splits, counter = {}, {"skipped": 0}
    for test in (False, True):
        settings = _settings(args, test)
        images, targets = load_dense_split(load_image_stream(settings), args.image_column, column, kind, args.crop_size,
                                           args.max_test if test else args.max_train, args.depth_scale,
                                           args.reduce_zero_label, max_pixels=settings.max_image_pixels, counter=counter)
        maps = patch_feature_maps(model.to(device), to_pixel_values(images, args.crop_size).to(device), args.batch_size)
        splits["test" if test else "train"] = (maps, targets)
    training = HeadTraining(epochs=args.epochs, lr=args.lr, seed=args.seed)
    (train_maps, train_targets), (test_maps, test_targets) = splits["train"], splits["test"]
    size = tuple(test_targets.shape[-2:])
    if args.task == "segmentation":
        head = train_segmentation_head(train_maps, train_targets, args.num_classes, training)
        metrics = segmentation_metrics(predict(head, test_maps, size), test_targets, args.num_classes)
    else:
        head = train_depth_head(train_maps, train_targets, training)
        metrics = depth_metrics(predict(head, test_maps, size), test_targets)
    return metrics, {"train_images": len(train_maps), "test_images": len(test_maps), "skipped_images": counter["skipped"]}


def _copy_detection(args: argparse.Namespace, model, common: dict) -> tuple[dict, dict]:
    """Database: the --dataset images; queries: strongly augmented copies of --num-queries of them."""
    import itertools

    from ..data.sources import load_image_stream
    from ..eval.features import extract_features, labelled_images
    from ..eval.retrieval import copy_detection_metrics, make_copy_queries

    counter = {"skipped": 0}
    settings = _settings(args, test=False)
    pairs = labelled_images(load_image_stream(settings), args.image_column, None, counter, settings.max_image_pixels)
    images = [image for image, _ in itertools.islice(pairs, args.max_train)]
    num_queries = args.num_queries or min(1000, len(images))
    if num_queries > len(images):
        raise ValueError(f"--num-queries {num_queries} exceeds the {len(images)} database images; lower it.")
    queries, sources = make_copy_queries(images, num_queries, seed=args.seed)
    database = extract_features(model, [(image, None) for image in images], description="database", **common)
    copies = extract_features(model, [(image, None) for image in queries], description="copies", **common)
    counts = {"train_images": len(images), "test_images": len(queries), "skipped_images": counter["skipped"]}
    return copy_detection_metrics(copies.cls, database.cls, sources), counts


def _run_task(args: argparse.Namespace, train, test, device: str) -> dict:
    from ..eval.knn import knn_classify
    from ..eval.linear import C_VALUES, linear_probe, logistic_regression
    from ..eval.retrieval import cosine_ranking, mean_average_precision

    if args.task == "retrieval":
        ground_truth = json.loads(Path(args.ground_truth).read_text())
        return mean_average_precision(cosine_ranking(test.cls, train.cls), ground_truth, mode=args.ap)

    if args.task == "knn":
        accuracy = knn_classify(train.cls, train.labels, test.cls, test.labels, ks=args.ks, temperature=args.temperature,
                                device=device)
        return {f"top1_k{k}": value for k, value in accuracy.items()}
    if args.task == "linear":
        return linear_probe(train, test, epochs=args.epochs, val_fraction=args.val_fraction, seed=args.seed, device=device)
    return logistic_regression(train.cls, train.labels, test.cls, test.labels, c_values=args.c_values or C_VALUES,
                               val_fraction=args.val_fraction, seed=args.seed)


def _headline(task: str, metrics: dict) -> dict[str, float]:
    """The numbers worth printing (the JSON file holds everything)."""
    if task == "knn":
        return metrics
    if task == "linear":
        return {"top1": metrics["top1"], "val_top1": metrics["best"]["val_top1"]}
    if task == "logreg":
        return {"top1": metrics["top1"], "best_c": metrics["best_c"]}
    if task == "segmentation":
        return {"miou": metrics["miou"], "pixel_accuracy": metrics["pixel_accuracy"]}
    return {k: v for k, v in metrics.items() if isinstance(v, float)}
