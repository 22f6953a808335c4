"""Add the validation score distributions (drift reference) to a model card made before it had them.

Scores the card's own validation split (split.csv beside the model) through the one pixel path
and the model, exactly as training would have, and writes ``score_reference`` into card.json
(card.md re-rendered).  Run from the checkout with ../shared beside it:

    .venv/bin/python scripts/backfill_score_reference.py models/default
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np

from dicom_io.pixels import to_model_tensor
from models.card import ModelCard
from models.registry import TriageModel
from training.train import score_reference

BATCH = 64


def main(folder: str) -> int:
    model = TriageModel.load(Path(folder))
    rows = [r for r in csv.DictReader((Path(folder) / "split.csv").open()) if r["split"] == "val"]
    scores, pops = [], []
    for start in range(0, len(rows), BATCH):
        chunk = rows[start : start + BATCH]
        x = np.stack([to_model_tensor(r["path"], model.input_size) for r in chunk])
        scores.append(model.predict_tensors(x))
        pops += [r["population"] for r in chunk]
        print(f"{start + len(chunk)}/{len(rows)}", file=sys.stderr)
    card = ModelCard.load(Path(folder) / "card.json")
    card.score_reference = score_reference(np.concatenate(scores), pops)
    card.save(folder)
    print({p: {f: sum(c) for f, c in v.items()} for p, v in card.score_reference.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1] if len(sys.argv) > 1 else "models/default"))
