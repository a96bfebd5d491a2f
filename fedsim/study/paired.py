"""Two runs on the same test images, compared image by image.

Each hospital writes its final model's answers to ``hospitals/<name>/predictions.csv`` in the run folder (its
own disk; the study is the researcher who owns every simulated hospital). Two runs of one seed answer the
same images, and the benchmark's test images are the same at every seed, so their disagreements are
McNemar's pairs; summed over seeds they give the test stratified by seed.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from fedsim.study.stats import Discordance, mcnemar

#: Where a run keeps its hospitals' answers.
PREDICTIONS = "predictions.csv"


def answers(folder: Path, hospitals: Iterable[str] | None = None) -> dict[tuple[str, str], bool]:
    """``{(hospital, image name): right}`` of a run's final model, from every (or the named) hospital's file."""
    wanted = None if hospitals is None else set(hospitals)
    out: dict[tuple[str, str], bool] = {}
    for path in sorted((folder / "hospitals").glob(f"*/{PREDICTIONS}")):
        hospital = path.parent.name
        if wanted is not None and hospital not in wanted:
            continue
        with open(path, newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                out[(hospital, row["name"])] = row["label"] == row["prediction"]
    return out


def discordance(a: dict[tuple[str, str], bool], b: dict[tuple[str, str], bool]) -> Discordance:
    """The disagreements of two runs over the images both answered."""
    common = a.keys() & b.keys()
    return Discordance(len(common), sum(a[k] and not b[k] for k in common), sum(b[k] and not a[k] for k in common))


@dataclass(frozen=True)
class Comparison:
    """Variant ``a`` against ``b`` on the same images: per seed and all seeds together."""

    a: str
    b: str
    scope: str  # which hospitals' images: "test" (the federation's) or "heldout"
    per_seed: dict[int, Discordance]

    @property
    def total(self) -> Discordance:
        total = Discordance(0, 0, 0)
        for d in self.per_seed.values():
            total = total + d
        return total

    @property
    def p(self) -> float:
        """McNemar's exact test over every seed's pairs."""
        return mcnemar(self.total)

    def seed_p(self, seed: int) -> float:
        return mcnemar(self.per_seed[seed])


def compare_runs(
    folders_a: dict[int, Path], folders_b: dict[int, Path], a: str, b: str, scope: str, hospitals: Iterable[str]
) -> Comparison:
    """The comparison over the seeds both variants finished, on the images of ``hospitals``."""
    names = list(hospitals)
    per_seed = {}
    for seed in sorted(folders_a.keys() & folders_b.keys()):
        first, second = answers(folders_a[seed], names), answers(folders_b[seed], names)
        if first and second:
            per_seed[seed] = discordance(first, second)
    return Comparison(a, b, scope, per_seed)
