"""The figures behind the header-less image bounds (settings ``eligibility.headerless``).

Decodes every PNG/JPEG chest film of the real collections through the pixel path's decoder
and measures it with ``dicom_io.image_scope.measure_image``, the code the scoring service
applies, then prints per collection: sizes, the shorter side's minimum, the largest aspect
ratio, the largest share of coloured pixels and the lowest contrast, each with its file, and
how many films the current bounds would refuse (it must be none).  Colour photographs that
ship with installed packages are measured too, as the other side of the colour bound.

Usage: python scripts/measure_image_scope.py [--json OUT]
(data from ../shared/data or $XRAY_TRIAGE_SHARED_DATA).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dicom_io.decode import decode  # noqa: E402
from dicom_io.image_scope import ImageMeasures, measure_image, scope_reasons  # noqa: E402
from settings import HeaderlessImageConfig  # noqa: E402

SHARED = Path(os.environ.get("XRAY_TRIAGE_SHARED_DATA", REPO.parent / "shared" / "data"))
COLLECTIONS = (
    "kermany",
    "nih-findings",
    "covid/actualmed",
    "covid/figure1",
    "covid/hannover",
    "adult-normals-rsna",
    "ieee8023-noncovid",
)
SUFFIXES = {".png", ".jpg", ".jpeg"}


def measured(path: Path, rules: HeaderlessImageConfig) -> ImageMeasures:
    dec = decode(path.read_bytes())
    return measure_image(dec.array, rules.colour_level, dec.full_shape)


def summary(rows: list[tuple[Path, ImageMeasures]], rules: HeaderlessImageConfig) -> dict[str, Any]:
    def extreme(key: Any, largest: bool) -> tuple[float, str]:
        path, m = (max if largest else min)(rows, key=lambda r: key(r[1]))
        return round(float(key(m)), 4), path.name

    sizes = sorted({(m.columns, m.rows) for _, m in rows})
    return {
        "images": len(rows),
        "sizes": f"{len(sizes)} distinct, {sizes[0][0]}x{sizes[0][1]} .. {sizes[-1][0]}x{sizes[-1][1]}",
        "min_shorter_side": extreme(lambda m: min(m.rows, m.columns), largest=False),
        "max_aspect": extreme(lambda m: m.aspect, largest=True),
        "portrait_over_landscape": sum(m.rows > m.columns for _, m in rows),
        "max_coloured_share": extreme(lambda m: m.coloured_share, largest=True),
        "min_contrast": extreme(lambda m: m.contrast, largest=False),
        "refused": [f"{p.name}: {'; '.join(r)}" for p, m in rows if (r := scope_reasons(m, rules))],
    }


def photographs() -> list[Path]:
    """Real colour photographs shipped with installed packages (matplotlib, scikit-learn)."""
    found: list[Path] = []
    try:
        import matplotlib

        found.append(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")
    except ImportError:
        pass
    try:
        import sklearn

        found += [Path(sklearn.__file__).parent / "datasets" / "images" / n for n in ("china.jpg", "flower.jpg")]
    except ImportError:
        pass
    return [p for p in found if p.exists()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the figures here as JSON too")
    args = parser.parse_args(argv)
    rules = HeaderlessImageConfig()
    if not SHARED.exists():
        print(f"real data not found: {SHARED}", file=sys.stderr)
        return 2
    report: dict[str, Any] = {"bounds": rules.model_dump(), "collections": {}}
    everything: list[tuple[Path, ImageMeasures]] = []
    for name in COLLECTIONS:
        files = sorted(p for p in (SHARED / name).rglob("*") if p.suffix.lower() in SUFFIXES)
        rows = [(p, measured(p, rules)) for p in files]
        everything += rows
        report["collections"][name] = summary(rows, rules)
        print(name, json.dumps(report["collections"][name]), flush=True)
    report["all"] = summary(everything, rules)
    print("all", json.dumps(report["all"]))
    for photo in photographs():
        m = measured(photo, rules)
        report.setdefault("photographs", {})[photo.name] = {
            "size": f"{m.columns}x{m.rows}",
            "coloured_share": round(m.coloured_share, 4),
            "contrast": round(m.contrast, 4),
            "refused": scope_reasons(m, rules),
        }
    print("photographs", json.dumps(report.get("photographs", {})))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if report["all"]["refused"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
