"""`xray-triage predict`: score image files from the command line through the one scoring service.

``predict --json`` prints one JSON object per line and is a stable interface (it is how the
model is evaluated on data we do not have): fields are only ever added, never renamed.  The
site configuration given with ``--config`` applies exactly as in the worker: its eligibility
rules and its threshold overrides.  A file outside what the model reads is not scored, as the
worker would not score it: a number printed beside a leg or a photograph is read as an answer.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.findings import DISCLAIMER, FINDING_NAMES
from settings import Settings
from worklist.reasons import plain_reason

if TYPE_CHECKING:  # the service pulls in Keras: imported when a command runs, not at CLI start
    from triage.service import Judgement, Scorer

AddFn = Callable[..., argparse.ArgumentParser]


def predict_record(judgement: Judgement, model_ref: str, priority: tuple[str, str] | None = None) -> dict[str, Any]:
    """The JSON object of one file: path, eligible, reason, scores, flags (with notes), model,
    and the priority the worker would give a study of this one file (with its reason).

    ``flags`` holds ``score >= threshold`` per finding at the image's operating point, then
    ``notes`` (eligibility notes and the operating point chosen) and the disclaimer.  A file
    that is not scored, because it cannot be read or is outside what the model reads
    (``eligible: false``), has ``scores: null``, only notes in ``flags``, and the reason.
    """
    j = judgement
    flags: dict[str, Any] = {}
    if j.scores is not None:
        flags = {**j.flags, "notes": list(j.notes), "disclaimer": DISCLAIMER}
    elif j.notes:
        flags = {"notes": list(j.notes)}
    return {
        "path": j.key,
        "eligible": bool(j.eligible),
        "reason": j.reason,
        "scores": j.scores,
        "flags": flags,
        "model": model_ref,
        "priority": priority[0] if priority else None,
        "priority_reason": priority[1] if priority else None,
    }


def judge_files(scorer: Scorer, paths: Sequence[str | os.PathLike[str]], batch_size: int = 16) -> list[Judgement]:
    """Judgements of files; an ineligible one carries its reason and no scores."""
    from triage.service import ImageInput

    inputs = [ImageInput(str(p), Path(p)) for p in paths]
    return scorer.judge(inputs, batch_size=batch_size)


def cmd_predict(settings: Settings, args: argparse.Namespace) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from db.models import StudyState
    from models.registry import TriageModel
    from triage.service import Scorer

    model = TriageModel.load(args.model, settings)
    scorer = Scorer(model, settings)
    n_failed = 0
    # chunks: thousands of files stream out line by line instead of all pixels held in memory
    chunk = max(1, args.batch_size) * 4
    for start in range(0, len(args.files), chunk):
        judged = judge_files(scorer, args.files[start : start + chunk], batch_size=args.batch_size)
        n_failed += sum(j.outcome is StudyState.FAILED for j in judged)
        _print(scorer, judged, args.json)
    if not args.json:
        print(DISCLAIMER)
    # 0: every file was read (scored, or ineligible with its reason: a correct answer about that
    # file, not a failure of the tool); 1: at least one could not be read or decoded (each line
    # says why) - a script must not take a missing file for a result.
    return 1 if n_failed else 0


def _print(scorer: Scorer, judged: list[Judgement], as_json: bool) -> None:
    from db.models import StudyState

    model_ref = scorer.model.ref
    for j in judged:
        priority = scorer.priority_of(j)
        if as_json:
            print(json.dumps(predict_record(j, model_ref, priority)), flush=True)
            continue
        print(f"{j.key}  [{model_ref}]")
        if j.outcome is StudyState.INELIGIBLE:
            print(f"  not scored, {plain_reason(j.outcome, j.reason)}")
            continue
        if j.scores is None:
            print(f"  not scored: {j.reason}")
            continue
        for f in FINDING_NAMES:
            if f in j.scores:
                mark = "FLAG" if j.flags.get(f) else "    "
                print(f"  {mark} {f:<10} {j.scores[f]:.3f}  (threshold {j.thresholds[f]:.3f}, {j.population} point)")
        print(f"  priority as a one-image study: {priority[0]} ({priority[1]})")


def register(add: AddFn) -> None:
    p = add("predict", cmd_predict, f"score DICOM/PNG/JPEG files. {DISCLAIMER}")
    p.epilog = (
        "A file outside what the model reads (the configuration's eligibility rules for a DICOM; "
        "colour, size, shape and contrast for a PNG or JPEG, eligibility.headerless) is not scored: "
        "its line gives the reason (JSON: eligible false, scores null). Exit status 0 when every file "
        "was read, scored or not eligible; 1 when at least one could not be read or decoded."
    )
    p.add_argument("files", nargs="+", help="image files")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--model", help="model folder or .keras file (default: models/default or $XRAY_TRIAGE_MODEL)")
    p.add_argument("--batch-size", type=int, default=16)
