"""Figure: real NIH nodule/mass films beside real RSNA normals with a synthetic nodule inserted.

A visual check that ``training.synthetic_nodules`` makes faint-to-moderate round opacities like
real ones, not white discs.  Row 1: three NIH films labelled only Nodule or Mass (the labels come
without boxes, so the whole film is shown at the model's 224 px).  Row 2: three RSNA normals with
one synthetic nodule each (small, medium, large), unmarked.  Row 3: the same films with the nodule
circled (cyan: the lung mask it was placed in).  Rows 4 and 5: crops around each synthetic
nodule with and without it, same grey scale, to judge its look.

Usage: python scripts/nodule_figure.py [OUT.png] [--seed N]
(default docs/img/synthetic-nodules.png; data from ../shared/data or $XRAY_TRIAGE_SHARED_DATA).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Ellipse

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dicom_io.pixels import to_model_tensor  # noqa: E402
from training.synthetic_nodules import (  # noqa: E402
    DEFAULT_SPACING_MM,
    NoduleSpec,
    add_synthetic_nodule,
    lung_mask,
)

SHARED_DATA = Path(os.environ.get("XRAY_TRIAGE_SHARED_DATA", REPO.parent / "shared" / "data"))
SIZES_MM = ((6.0, 12.0), (14.0, 24.0), (28.0, 40.0))
CROP = 80


def nih_nodule_films(data: Path, n: int = 3) -> list[tuple[Path, str]]:
    """The first n NIH films (by file name) whose only findings are Nodule and/or Mass."""
    with (data / "nih-findings" / "labels.csv").open(newline="") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: r["Image Index"])
    picked = []
    for row in rows:
        labels = set(row["Finding Labels"].split("|"))
        if labels and labels <= {"Nodule", "Mass"}:
            picked.append((data / "nih-findings" / "images" / row["Image Index"], row["Finding Labels"]))
        if len(picked) == n:
            break
    return picked


def rsna_normals(data: Path, rng: np.random.Generator, n: int = 3) -> list[Path]:
    """n RSNA adult normal films drawn with the seed."""
    files = sorted((data / "adult-normals-rsna" / "images").glob("*.jpg"))
    return [files[i] for i in sorted(rng.choice(len(files), size=n, replace=False))]


def crop(image: np.ndarray, spec: NoduleSpec) -> tuple[np.ndarray, tuple[int, int]]:
    """A CROP x CROP window around the nodule, clamped to the image; also its origin."""
    r0 = int(np.clip(round(spec.row) - CROP // 2, 0, image.shape[0] - CROP))
    c0 = int(np.clip(round(spec.col) - CROP // 2, 0, image.shape[1] - CROP))
    return image[r0 : r0 + CROP, c0 : c0 + CROP], (r0, c0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=str(REPO / "docs" / "img" / "synthetic-nodules.png"))
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    fig, axes = plt.subplots(5, 3, figsize=(9, 15.4))
    show = {"cmap": "gray", "vmin": 0.0, "vmax": 1.0, "interpolation": "nearest"}
    for ax, (path, labels) in zip(axes[0], nih_nodule_films(SHARED_DATA), strict=True):
        ax.imshow(to_model_tensor(path)[..., 0], **show)
        ax.set_title(f"NIH {path.stem}\nreal: {labels}", fontsize=9)

    for col, (path, size) in enumerate(zip(rsna_normals(SHARED_DATA, rng), SIZES_MM, strict=True)):
        image = to_model_tensor(path)[..., 0]
        mask = lung_mask(image)
        out, spec = add_synthetic_nodule(image, rng, mask=mask, diameter_mm=size)
        if spec is None:
            raise SystemExit(f"no nodule fits in {path.name}")
        peak = float((out - image).max())
        axes[1, col].imshow(out, **show)
        axes[1, col].set_title(f"RSNA normal {path.stem}\n+ synthetic, unmarked", fontsize=9)
        axes[2, col].imshow(out, **show)
        axes[2, col].contour(mask, [0.5], colors="tab:cyan", linewidths=0.6)
        axes[2, col].add_patch(
            Ellipse(
                (spec.col, spec.row),
                2 * spec.a + 8,
                2 * spec.b + 8,
                angle=np.degrees(spec.angle),
                fill=False,
                edgecolor="tab:red",
                linewidth=1.2,
            )
        )
        axes[2, col].set_title(
            f"{spec.diameter_mm:.0f} mm ({spec.diameter_px:.1f} px), contrast {spec.contrast:.2f}\n"
            f"peak +{peak:.3f}; cyan: lung mask",
            fontsize=9,
        )
        window, (r0, c0) = crop(out, spec)
        extent = (c0 - 0.5, c0 + CROP - 0.5, r0 + CROP - 0.5, r0 - 0.5)
        axes[3, col].imshow(window, **show, extent=extent)
        axes[3, col].set_title(f"{CROP}-px crop, with the nodule", fontsize=9)
        axes[4, col].imshow(image[r0 : r0 + CROP, c0 : c0 + CROP], **show, extent=extent)
        axes[4, col].set_title("same crop of the original", fontsize=9)

    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        f"Real nodule/mass films (top) vs synthetic nodules in real normals (assumed {DEFAULT_SPACING_MM} mm/px)",
        fontsize=10,
    )
    fig.tight_layout()
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=90)
    print(out_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
