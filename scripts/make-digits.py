#!/usr/bin/env python3
"""Regenerates data/digits.csv from scikit-learn's bundled copy (pip install scikit-learn)."""
from pathlib import Path

from sklearn.datasets import load_digits

digits = load_digits()
out = Path(__file__).resolve().parent.parent / "data" / "digits.csv"
with out.open("w") as f:
    f.write(",".join([f"pixel_{i}" for i in range(64)] + ["label"]) + "\n")
    for row, label in zip(digits.data.astype(int), digits.target.astype(int)):
        f.write(",".join(map(str, row)) + f",{label}\n")
print(f"wrote {out}")
