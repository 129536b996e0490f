"""Reading what an export holds, with errors that name the file: anomaly maps (TIFF), point
scores (one per line) and image-score files (CSV with ``category, defect, id, score``)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
import torch

from bench.errors import DataError

SCORE_COLUMNS = ("category", "defect", "id", "score")
Key = tuple[str, str, str]
#: what a scores file must hold, for its error messages
SCORES_EXPECTED = (
    f"expected a CSV file with the columns {','.join(SCORE_COLUMNS)} and one row per test image"
)


class MissingInput(DataError, FileNotFoundError):
    """An input file or folder that is not there: one line naming it (a ``DataError``), and a
    ``FileNotFoundError`` all the same."""


def read_point_scores(path: Path, n: int) -> torch.Tensor:
    try:
        values = np.loadtxt(path, dtype=np.float64, ndmin=1)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read point scores {path}: {err}") from err
    if values.ndim != 1 or len(values) != n:
        raise DataError(
            f"point scores {path} hold {values.size} values, expected one per line for each of "
            f"the cloud's {n} points"
        )
    _check_finite(values, path, "point scores")
    return torch.from_numpy(values.astype(np.float32))


def read_map(path: Path) -> torch.Tensor:
    try:
        array = tifffile.imread(path)
    except Exception as err:
        raise DataError(f"cannot read anomaly map {path}: {err}") from err
    array = np.squeeze(array)
    if array.ndim != 2:
        raise DataError(f"anomaly map {path} has shape {array.shape}, expected a 2-D map")
    _check_finite(array, path, "anomaly map")
    return torch.from_numpy(array.astype(np.float32))


def _check_finite(values: np.ndarray, path: Path, what: str) -> None:
    bad = int(np.count_nonzero(~np.isfinite(values)))
    if bad:
        raise DataError(
            f"{what} {path} has NaN or infinite values ({bad} of {values.size}); expected finite scores"
        )


def read_scores(paths: list[str | Path]) -> dict[Key, tuple[float, str]]:
    """``{(category, defect, id): (score, "<file>, line <n>")}``; a duplicated row or a score
    that is not a finite number is an error naming the file and line."""
    scores: dict[Key, tuple[float, str]] = {}
    for path in paths:
        frame = _score_table(Path(path))
        for line, row in enumerate(frame[list(SCORE_COLUMNS)].itertuples(index=False), start=2):
            if not any(row):
                continue  # a blank line
            key, where = (row.category, row.defect, row.id), f"scores file {path}, line {line}"
            if key in scores:
                raise DataError(
                    f"{where}: row ({', '.join(key)}) repeats the one at {scores[key][1]}; "
                    "expected one row per test image"
                )
            scores[key] = (_score(row.score, where), f"{path}, line {line}")
    return scores


def _score_table(path: Path) -> pd.DataFrame:
    """The rows of a scores file as text; a DataError naming the file and what it must hold
    when it is missing, empty, not CSV or lacks a column."""
    if not path.exists():
        raise MissingInput(f"scores file {path} does not exist; {SCORES_EXPECTED}")
    if not path.is_file():
        raise DataError(f"scores file {path} is not a file; {SCORES_EXPECTED}")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, skip_blank_lines=False)
    except pd.errors.EmptyDataError as err:
        raise DataError(f"scores file {path} is empty; {SCORES_EXPECTED}") from err
    except (OSError, UnicodeDecodeError, pd.errors.ParserError) as err:
        reason = " ".join(str(err).split())  # pandas' messages span lines
        raise DataError(
            f"scores file {path} cannot be read as CSV ({reason}); {SCORES_EXPECTED}"
        ) from err
    missing = [c for c in SCORE_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"scores file {path} lacks column(s) {missing}; {SCORES_EXPECTED}")
    if not frame[list(SCORE_COLUMNS)].astype(bool).any(axis=None):
        raise DataError(f"scores file {path} holds no rows, only its header; {SCORES_EXPECTED}")
    return frame


def _score(raw: str, where: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise DataError(f"{where}: score {raw!r} is not a finite number")
    return value


def _check_known(
    scores: dict[Key, tuple[float, str]],
    known: set[Key],
    categories: list[str],
    others: list[str],
):
    """Every row of the scores file(s) names a test image of the evaluated categories (rows of
    the dataset's ``others`` categories, not evaluated now, are passed over: one file may hold
    every category)."""
    for key, (_, where) in scores.items():
        if key not in known and key[0] not in others:
            raise DataError(
                f"scores file {where}: row ({', '.join(key)}) matches no test image of the "
                f"evaluated categories {categories}"
            )
