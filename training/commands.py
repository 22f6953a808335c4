"""The `train` and `evaluate` sub-commands of `xray-triage`.

Kept out of xray_triage/cli.py so the CLI's parser stays cheap to import: Keras loads only when
one of these commands actually runs.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from models.findings import FINDING_NAMES

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

    # Never into the model's own folder by default: the shipped model's reports are part of it.
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out_dir = args.out or str(Path.cwd() / f"evaluation-{Path(args.model).name}-{args.split}-{stamp}")
    out = evaluate(
        args.model,
        args.data,
        out_dir=out_dir,
        finding=args.finding,
        split=args.split,
        compare=args.compare,
        n_boot=args.bootstrap,
    )
    print(out)
    return 0


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
    p.add_argument("--out", help="report folder (default: ./evaluation-<model>-<split>-<UTC time>)")
    p.add_argument("--compare", help="another model to evaluate on the same images (e.g. the baseline)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates for AUC intervals")
