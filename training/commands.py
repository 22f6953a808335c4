"""The `train`, `evaluate` and `predict` sub-commands of `xray-triage`.

Kept out of worker/cli.py so the CLI's parser stays cheap to import: Keras loads only when
one of these commands actually runs.  ``predict --json`` prints one JSON object per line and
is a stable interface (it is how the model is evaluated on data we do not have), so fields
are only ever added, never renamed.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from typing import Any

from models.findings import DISCLAIMER, FINDING_NAMES

AddFn = Callable[..., argparse.ArgumentParser]


def _quiet_backend() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def cmd_train(settings: Any, args: argparse.Namespace) -> int:
    _quiet_backend()
    from training.train import train

    path = train(args.train_config, resume=not args.restart)
    print(path)
    return 0


def cmd_evaluate(settings: Any, args: argparse.Namespace) -> int:
    _quiet_backend()
    from training.evaluate import evaluate

    out = evaluate(
        args.model,
        args.data,
        out_dir=args.out,
        finding=args.finding,
        split=args.split,
        compare=args.compare,
        n_boot=args.bootstrap,
    )
    print(out)
    return 0


def cmd_predict(settings: Any, args: argparse.Namespace) -> int:
    _quiet_backend()
    from models.registry import TriageModel

    model = TriageModel.load(args.model, settings)
    n_scored = 0
    # chunks: thousands of files stream out line by line instead of all pixels held in memory
    chunk = max(1, args.batch_size) * 4
    for start in range(0, len(args.files), chunk):
        results = model.score_files(args.files[start : start + chunk], batch_size=args.batch_size)
        n_scored += sum(r.scores is not None for r in results)
        _print_results(model, results, args.json)
    if not args.json:
        print(DISCLAIMER)
    return 0 if n_scored or not args.files else 1


def _print_results(model: Any, results: list[Any], as_json: bool) -> None:
    for r in results:
        if as_json:
            print(json.dumps(r.to_dict()), flush=True)
            continue
        print(f"{r.path}  [{model.ref}]")
        if r.scores is None:
            print(f"  not scored: {r.reason}")
            continue
        if not r.eligible:
            print(f"  ineligible: {r.reason} (scores shown for information only)")
        for f in FINDING_NAMES:
            if f in r.scores:
                mark = "FLAG" if r.flags.get(f) else "    "
                print(f"  {mark} {f:<10} {r.scores[f]:.3f}  (threshold {model.threshold(f, r.population):.3f})")


def register_commands(add: AddFn) -> None:
    """Attach the sub-commands to the main parser through its ``add(name, func, help)`` helper."""
    p = add("train", cmd_train, "train a model from a training config (resumable); see docs/training.md")
    # dest differs from the global --config (the site configuration) on purpose
    p.add_argument("--config", dest="train_config", required=True, help="training/configs/<name>.yaml")
    p.add_argument("--restart", action="store_true", help="discard the run folder and start from epoch 0")

    p = add("evaluate", cmd_evaluate, "evaluate a model: metrics.json, plots and report.md in a report folder")
    p.add_argument("--model", required=True, help="model folder or .keras file")
    p.add_argument("--data", required=True, help="split CSV, a dataset folder, or the shared data root")
    p.add_argument("--finding", choices=FINDING_NAMES, help="only this finding (default: all)")
    p.add_argument(
        "--split",
        default="val",
        help="split to report when --data is a split CSV: train, val, test, holdout (val+test) or all (default val)",
    )
    p.add_argument("--out", help="report folder (default: <model folder>/report)")
    p.add_argument("--compare", help="another model to evaluate on the same images (e.g. the baseline)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates for AUC intervals")

    p = add("predict", cmd_predict, f"score DICOM/PNG/JPEG files. {DISCLAIMER}")
    p.add_argument("files", nargs="+", help="image files")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--model", help="model folder or .keras file (default: models/default or $XRAY_TRIAGE_MODEL)")
    p.add_argument("--batch-size", type=int, default=16)
