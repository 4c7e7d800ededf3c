"""The `wsss` command line: `wsss run RECIPE`, one subcommand per stage, and data/evaluation tools.

Every subcommand also runs as `python -m wsss <subcommand> ...`. Recipes are YAML files in
configs/; any key can be overridden on the command line with `section.key=value`.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from wsss import pipeline
from wsss.errors import WsssError, run_guarded
from wsss.registry import STAGES

log = logging.getLogger("wsss")

def _add_recipe_args(p: argparse.ArgumentParser, recipe_required: bool = True) -> None:
    p.add_argument("recipe", nargs=None if recipe_required else "?", help="recipe YAML, e.g. configs/shapes_cam.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. seg.lr=0.01 seg.epochs=3")
    p.add_argument("--force", action="store_true", help="rerun stages even if their outputs exist for this config")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wsss",
        description="Weakly supervised semantic segmentation: image-level tags, scribbles or saliency -> pixel masks.\n"
                    "Pipeline: " + " -> ".join(STAGES.get(n).cli for n in pipeline.default_stages()) + ".\n"
                    "Outputs go to runs/<name>/ (config.yaml, manifest.json, cams/, pseudo/, seg/, pred/, metrics/, report/).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="command", required=True)

    p = sub.add_parser("run", help="run every stage of a recipe in order (finished stages are skipped)",
                       description="Run the stages listed in run.stages of RECIPE. A stage whose outputs exist for the "
                                   "same config is skipped; an interrupted stage resumes. Example:\n"
                                   "  wsss run configs/shapes_cam.yaml seg.epochs=5",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_recipe_args(p)
    p.add_argument("--stages", default="", help="comma-separated subset of stages to run (default: run.stages)")

    for _, st in STAGES.items():
        description = _evaluate_description() if st.name == "evaluate" else _module_doc(st.module) or st.help
        p = sub.add_parser(st.cli, help=st.help, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
        if st.name == "evaluate":
            _add_recipe_args(p, recipe_required=False)
            p.add_argument("--pred", help="folder of predicted index PNGs (<id>.png)")
            p.add_argument("--gt", help="folder of ground-truth index/palette PNGs (<id>.png)")
            _add_class_args(p)
        else:
            _add_recipe_args(p)

    p = sub.add_parser("eval-cam", help="pseudo-mask quality: CAM seed mIoU over a background-threshold sweep",
                       description="Seed quality as the field reports it (CAM mIoU on train, best background threshold).\n"
                                   "Either RECIPE (uses the run's cams/ and the split's masks) or --cams DIR --gt DIR.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_recipe_args(p, recipe_required=False)
    p.add_argument("--cams", help="folder of <id>.npz CAM files (wsss format)")
    p.add_argument("--gt", help="folder of ground-truth PNGs")
    p.add_argument("--thresholds", default="", help="comma-separated thresholds (default 0.05..0.60 step 0.05)")
    _add_class_args(p)

    p = sub.add_parser("eval-saliency", help="saliency quality: MAE, max F (beta^2=0.3), foreground IoU vs GT masks",
                       description="Score 8-bit saliency maps against the ground-truth foreground (any non-background "
                                   "class; 255 ignored). Either RECIPE (the run's saliency/ and the train split's masks) "
                                   "or --saliency DIR --gt DIR (every <id>.png of --gt needs a map).",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_recipe_args(p, recipe_required=False)
    p.add_argument("--saliency", help="folder of <id>.png saliency maps (grayscale 0..255)")
    p.add_argument("--gt", help="folder of ground-truth index/palette PNGs")
    p.add_argument("--threshold", type=float, default=None, help="foreground IoU threshold (default saliency.threshold = 0.5)")
    p.add_argument("--only-present", action="store_true", help="--gt mode: score only ids that have a saliency map "
                                                                   "(default: every GT id needs one)")
    p.add_argument("--json", help="also write the scores to this JSON file")

    p = sub.add_parser("predict", help="segment new images (a folder) with a trained run",
                       description="Predict every image in --input with the run's segmenter; writes index PNGs "
                                   "(VOC palette) and overlays to --output.")
    _add_recipe_args(p)
    p.add_argument("--input", required=True, help="folder of images (jpg/png)")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--scales", default="", help="comma-separated test scales (default: eval.scales)")
    p.add_argument("--flip", action="store_true", help="average with the horizontal flip")
    p.add_argument("--crf", action="store_true", help="dense-CRF refinement (eval.crf_params)")

    p = sub.add_parser("crf", help="dense-CRF refinement of a folder of CAMs into label PNGs",
                       description="Refine CAMs (<id>.npz) into label maps with the fully connected CRF "
                                   "(PyTorch permutohedral lattice; no native build).")
    p.add_argument("--cams", required=True, help="folder of <id>.npz CAM files")
    p.add_argument("--images", required=True, help="folder of the matching images (<id>.jpg or .png)")
    p.add_argument("--output", required=True, help="output folder for <id>.png label maps")
    p.add_argument("--preset", default="psa", help="parameter preset (psa, irn, pmm_ppmg, pmm_seed, pmm_cyclic, auxsegnet)")
    p.add_argument("--alpha", type=float, default=4.0, help="background score (1 - max CAM)^alpha")
    p.add_argument("--iterations", type=int, default=-1, help="mean-field iterations (default: the preset's)")

    p = sub.add_parser("data", help="data tools: generate shapes, convert ScribbleSup, write cls_labels, check a set")
    dsub = p.add_subparsers(dest="data_command", metavar="tool", required=True)
    q = dsub.add_parser("shapes", help="generate the synthetic set and print where it is")
    q.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data.shapes.num_train=500")
    q = dsub.add_parser("scribblesup", help="convert ScribbleSup XML annotations to index PNGs")
    q.add_argument("--xml", required=True, help="folder of ScribbleSup .xml files")
    q.add_argument("--images", required=True, help="folder of the matching JPEG images")
    q.add_argument("--out", required=True, help="output folder for <id>.png scribbles")
    q.add_argument("--width", type=int, default=3, help="stroke width in pixels (rloss's converter uses 3)")
    q.add_argument("--margin", type=int, default=2, help="points up to this many pixels outside the image are clipped")
    q.add_argument("--skip-bad", action="store_true", help="list bad XML files in the summary instead of stopping")
    q = dsub.add_parser("cls-labels", help="write image-level labels (cls_labels.npy) of a recipe's data set")
    _add_recipe_args(q)
    q.add_argument("--output", required=True, help="output .npy path")
    q.add_argument("--format", choices=["int", "str"], default="str", help="int-encoded keys (IRN/PSA) or string keys (ToCo)")
    q.add_argument("--splits", default="", help="comma-separated splits (default: train and val splits)")
    q = dsub.add_parser("check", help="read every sample of a recipe's data set and report problems")
    _add_recipe_args(q)

    p = sub.add_parser("demo", help="the README's main job: the whole pipeline on the synthetic set, weak vs full",
                       description="Trains a segmenter on ground-truth masks (configs/shapes_full.yaml) and runs the whole "
                                   "image-level pipeline (configs/shapes_cam.yaml) on the built-in synthetic set, then prints "
                                   "seed, pseudo-mask and val mIoU side by side and writes HTML reports.")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides applied to both recipes")
    p.add_argument("--force", action="store_true")
    return parser


def _module_doc(module: str) -> str:
    """A stage module's docstring, read without importing it (keeps `wsss --help` instant)."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        return ""
    return ast.get_docstring(ast.parse(Path(spec.origin).read_text())) or ""


def _add_class_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--classes", help="class list file, one name per line, background first")
    p.add_argument("--num-classes", type=int, help="number of classes incl. background (names become 0..C-1)")
    p.add_argument("--dataset", choices=["voc12", "coco14", "shapes"], help="use a known class list (default voc12)")
    p.add_argument("--absent", choices=["union", "gt"], default="union",
                   help="which classes enter the mean: present in GT or prediction (union), or in GT only")
    p.add_argument("--json", help="also write the metrics to this JSON file")


def _evaluate_description() -> str:
    return ("Score a segmenter. With RECIPE: predict the recipe's eval split and compare with its masks.\n"
            "With --pred DIR --gt DIR: compare any two folders of index PNGs (named <id>.png), e.g.\n"
            "  wsss evaluate --pred my_preds/ --gt VOC2012/SegmentationClass --dataset voc12\n"
            "mIoU comes from one confusion matrix accumulated over all images; label 255 in the GT is ignored.")


def _class_names(args: argparse.Namespace) -> list[str]:
    if args.classes:
        path = Path(args.classes)
        if not path.is_file():
            raise WsssError(f"{path}: class list not found")
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if args.num_classes:
        return [str(i) for i in range(args.num_classes)]
    from wsss.data import classes as known

    return list(known.CLASS_LISTS[args.dataset or "voc12"])


def cmd_run(args: argparse.Namespace) -> None:
    rd = pipeline.open_run(args.recipe, args.overrides, args.force)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    pipeline.run_stages(rd, stages)
    pipeline.print_summary(rd)


def cmd_stage(stage: str, args: argparse.Namespace) -> None:
    rd = pipeline.open_run(args.recipe, args.overrides, args.force)
    pipeline.run_stages(rd, [stage])
    pipeline.print_summary(rd)


def cmd_evaluate(args: argparse.Namespace) -> None:
    if args.pred or args.gt:
        if not (args.pred and args.gt):
            raise WsssError("evaluate: give both --pred and --gt (or a RECIPE)")
        from wsss.io import atomic
        from wsss.evaluation import evaluate_folders

        result = evaluate_folders(Path(args.pred), Path(args.gt), _class_names(args), args.absent)
        print(result.table(f"{args.pred} vs {args.gt}"))
        print(f"mIoU {100 * result.miou:.2f}")
        if args.json:
            atomic.write_json(args.json, result.to_dict())
        return
    if not args.recipe:
        raise WsssError("evaluate: give a RECIPE, or --pred DIR --gt DIR")
    cmd_stage("evaluate", args)


def cmd_eval_cam(args: argparse.Namespace) -> None:
    from wsss.io import atomic
    from wsss.pseudo.quality import DEFAULT_THRESHOLDS, best_threshold, cam_threshold_sweep, sweep_table

    thresholds = [float(t) for t in args.thresholds.split(",") if t] or list(DEFAULT_THRESHOLDS)
    if args.cams:
        if not args.gt:
            raise WsssError("eval-cam: --cams needs --gt")
        from wsss.data.folder_masks import MaskFolder

        ds = MaskFolder(Path(args.gt), _class_names(args))
        ids = [p.stem for p in atomic.finished_files(args.cams, "*.npz")]
        if not ids:
            raise WsssError(f"{args.cams}: no .npz CAM files")
        sweep = cam_threshold_sweep(Path(args.cams), ds, ids, thresholds, args.absent)
    else:
        if not args.recipe:
            raise WsssError("eval-cam: give a RECIPE, or --cams DIR --gt DIR")
        from wsss.stages.common import cam_split, split_dataset

        rd = pipeline.open_run(args.recipe, args.overrides)
        ds = split_dataset(rd.cfg, cam_split(rd.cfg))
        sweep = cam_threshold_sweep(rd.sub("cams"), ds, ds.ids, thresholds, args.absent)
    print(sweep_table(sweep))
    t, m = best_threshold(sweep)
    print(m.table(f"best background threshold {t:.2f}"))
    print(f"CAM seed mIoU {100 * m.miou:.2f} at threshold {t:.2f}")
    if args.json:
        atomic.write_json(args.json, {f"{tt:.2f}": mm.to_dict() for tt, mm in sweep})


def cmd_eval_saliency(args: argparse.Namespace) -> None:
    from wsss.io import atomic
    from wsss.saliency.metrics import evaluate_saliency_dataset, evaluate_saliency_folder

    if args.saliency or args.gt:
        if not (args.saliency and args.gt):
            raise WsssError("eval-saliency: give both --saliency and --gt (or a RECIPE)")
        ids = None
        if args.only_present:
            from wsss.io.atomic import finished_files

            ids = [p.stem for p in finished_files(args.gt, "*.png") if (Path(args.saliency) / p.name).is_file()]
            if not ids:
                raise WsssError(f"eval-saliency: no <id>.png in both {args.saliency} and {args.gt}")
        result = evaluate_saliency_folder(args.saliency, args.gt, 0.5 if args.threshold is None else args.threshold, ids)
        title = f"{args.saliency} vs {args.gt}"
    else:
        if not args.recipe:
            raise WsssError("eval-saliency: give a RECIPE, or --saliency DIR --gt DIR")
        from wsss.stages.common import split_dataset
        from wsss.stages.saliency import saliency_split

        rd = pipeline.open_run(args.recipe, args.overrides)
        ds = split_dataset(rd.cfg, saliency_split(rd.cfg))
        if not ds.has_masks:
            raise WsssError(f"eval-saliency: split {saliency_split(rd.cfg)} has no ground-truth masks")
        threshold = rd.cfg.saliency.threshold if args.threshold is None else args.threshold
        result = evaluate_saliency_dataset(rd.sub("saliency"), ds, threshold)
        title = f"{rd.sub('saliency')} ({rd.cfg.saliency.source})"
    print(f"{title}\n{result.line()}")
    if args.json:
        atomic.write_json(args.json, result.to_dict())


def cmd_predict(args: argparse.Namespace) -> None:
    from wsss.tools.predict import predict_folder

    rd = pipeline.open_run(args.recipe, args.overrides)
    scales = [float(s) for s in args.scales.split(",") if s] or list(rd.cfg.eval.scales)
    n = predict_folder(rd, Path(args.input), Path(args.output), scales, args.flip, args.crf)
    print(f"predicted {n} images -> {args.output}")


def cmd_crf(args: argparse.Namespace) -> None:
    from wsss.tools.crf import refine_folder

    n = refine_folder(Path(args.cams), Path(args.images), Path(args.output), args.preset, args.alpha, args.iterations)
    print(f"refined {n} CAM files -> {args.output}")


def cmd_data(args: argparse.Namespace) -> None:
    if args.data_command == "shapes":
        from wsss.config import load_recipe
        from wsss.data import build_dataset

        cfg = load_recipe(None, ["data.dataset=shapes", *args.overrides])
        train = build_dataset(cfg.data, "train")
        val = build_dataset(cfg.data, "val")
        print(f"shapes: {len(train)} train + {len(val)} val images in {train.dir}")
    elif args.data_command == "scribblesup":
        from wsss.data.classes import VOC_CLASSES
        from wsss.data.scribblesup import convert_scribblesup

        summary = convert_scribblesup(Path(args.xml), Path(args.images), Path(args.out), VOC_CLASSES,
                                      width=args.width, margin=args.margin, skip_bad=args.skip_bad, progress=True)
        print(summary)
    elif args.data_command == "cls-labels":
        from wsss.data.labels import write_cls_labels
        from wsss.stages.common import split_dataset

        rd = pipeline.open_run(args.recipe, args.overrides)
        splits = [s for s in args.splits.split(",") if s] or [rd.cfg.data.train_split, rd.cfg.data.val_split]
        datasets = [split_dataset(rd.cfg, s) for s in splits]
        n = write_cls_labels(datasets, Path(args.output), args.format)
        print(f"wrote labels of {n} images to {args.output} ({args.format} keys)")
    elif args.data_command == "check":
        from wsss.data import build_dataset
        from wsss.io.images import CONVERSIONS

        rd = pipeline.open_run(args.recipe, args.overrides)
        for split in dict.fromkeys([rd.cfg.data.train_split, rd.cfg.data.val_split]):
            ds = build_dataset(rd.cfg.data, split)
            n = len(ds)
            parts = ["image", "labels"] + [p for p, has in (("mask", ds.has_masks), ("scribble", ds.has_scribbles),
                                                             ("saliency", ds.has_saliency)) if has]
            ds.check(parts, progress=True)
            print(f"{split}: {len(ds)} of {n} samples OK ({', '.join(parts)})" +
                  (f"; {len(ds.skipped)} skipped" if ds.skipped else ""))
        if CONVERSIONS.counts:
            print(CONVERSIONS.summary())


def cmd_demo(args: argparse.Namespace) -> None:
    pipeline.run_demo(args.overrides, args.force)


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("KMP_WARNINGS", "0")
    args = build_parser().parse_args(argv)
    from wsss.stages.common import setup_logging

    setup_logging(args.verbose)
    if args.command == "run":
        run_guarded(lambda: cmd_run(args))
    elif args.command == "evaluate":
        run_guarded(lambda: cmd_evaluate(args))
    elif args.command == "eval-cam":
        run_guarded(lambda: cmd_eval_cam(args))
    elif args.command == "eval-saliency":
        run_guarded(lambda: cmd_eval_saliency(args))
    elif args.command == "predict":
        run_guarded(lambda: cmd_predict(args))
    elif args.command == "crf":
        run_guarded(lambda: cmd_crf(args))
    elif args.command == "data":
        run_guarded(lambda: cmd_data(args))
    elif args.command == "demo":
        run_guarded(lambda: cmd_demo(args))
    else:
        stage = next(name for name, st in STAGES.items() if st.cli == args.command)
        run_guarded(lambda: cmd_stage(stage, args))


if __name__ == "__main__":
    main()
