"""Classifiers that judge generated images: the built-in digits judge and judge files.

A judge is a linear classifier over small grey images: an image is turned into
:attr:`LinearJudge.size` grey pixels scaled to ``[0, max_value]`` with the ink bright
(:func:`image_features`), optionally standardised (``(x - mean) / scale``), then
``argmax(x @ coef.T + intercept)`` names its class.

Judge files are ``.npz`` archives read with ``numpy.load(allow_pickle=False)``, so a file
from anywhere can be opened safely (no pickle is ever executed). Arrays:

- ``coef`` float ``[C, F]`` and ``intercept`` float ``[C]``: the linear model;
- ``classes`` unicode ``[C]``: the class words (digits may be numerals or words);
- ``size`` int ``[2]``: ``[height, width]`` of the input grid, ``F = height * width``;
- ``max_value`` float scalar: the value of full ink (16 for scikit-learn's digits);
- optional ``mean``, ``scale`` float ``[F]``: standardisation applied before ``coef``;
- optional ``test_accuracy`` float scalar: the judge's own held-out accuracy, reported.

:func:`save_judge` writes one (e.g. from any scikit-learn linear classifier's ``coef_``,
``intercept_`` and ``classes_``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import DataError, UsageError

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

DIGITS_SEED = 0
DIGITS_TEST_FRACTION = 0.25


@dataclass
class LinearJudge:
    """A linear image classifier (see the module docstring for the meaning of each field)."""

    coef: "np.ndarray"
    intercept: "np.ndarray"
    classes: list[str]
    size: tuple[int, int] = (8, 8)
    max_value: float = 16.0
    mean: "np.ndarray | None" = None
    scale: "np.ndarray | None" = None
    test_accuracy: float | None = None
    name: str = ""

    def predict(self, features: "np.ndarray") -> list[str]:
        """``[N, F]`` features to N class words."""
        import numpy as np

        x = np.asarray(features, dtype=np.float64)
        if self.mean is not None:
            x = (x - self.mean) / self.scale
        scores = x @ self.coef.T + self.intercept
        return [self.classes[i] for i in np.argmax(scores, axis=1)]

    def classify(self, images: "list[Image.Image]") -> list[str]:
        import numpy as np

        if not images:
            return []
        return self.predict(np.stack([image_features(im, self.size, self.max_value) for im in images]))


def image_features(image: "Image.Image", size: tuple[int, int] = (8, 8), max_value: float = 16.0) -> "np.ndarray":
    """A PIL image as the flat ``[h * w]`` input of a judge, like scikit-learn's digits.

    Grey (Pillow's ``L``); inverted when its border is brighter than mid-grey, so that the
    background is dark and the ink bright as in the digits data; box-filtered down to
    ``size`` (``(height, width)``; the digits were made by counting ink in 4x4 blocks); scaled
    so that white is ``max_value``. Float64.
    """
    import numpy as np
    from PIL import Image, ImageOps

    grey = image.convert("L")
    arr = np.asarray(grey, dtype=np.float64)
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    if border.mean() > 127.5:
        grey = ImageOps.invert(grey)
    small = grey.resize((size[1], size[0]), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float64).reshape(-1) * (max_value / 255.0)


def digits_judge(seed: int = DIGITS_SEED) -> LinearJudge:
    """The built-in judge: scikit-learn's logistic regression on scikit-learn's digits.

    The 1,797 8x8 digits are split by ``train_test_split(test_size=0.25, stratify=y,
    random_state=seed)``; features are standardised on the training split; the model is
    ``LogisticRegression(max_iter=2000)``. ``test_accuracy`` is measured on the 450 held-out
    digits. Classes are the numerals ``"0"``..``"9"``. Deterministic for a seed (about 0.5 s).
    """
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(digits.data, digits.target, test_size=DIGITS_TEST_FRACTION,
                                                        stratify=digits.target, random_state=seed)
    mean = x_train.mean(axis=0)
    scale = x_train.std(axis=0)
    scale[scale == 0] = 1.0
    model = LogisticRegression(max_iter=2000).fit((x_train - mean) / scale, y_train)
    judge = LinearJudge(coef=model.coef_, intercept=model.intercept_, classes=[str(c) for c in model.classes_],
                        size=(8, 8), max_value=16.0, mean=mean, scale=scale, name=f"digits-logreg-seed{seed}")
    judge.test_accuracy = float(np.mean(np.asarray(judge.predict(x_test)) == y_test.astype(str)))
    return judge


def save_judge(judge: LinearJudge, path: str | Path) -> None:
    """Write ``judge`` as a judge file (atomically)."""
    import numpy as np

    arrays = {"coef": np.asarray(judge.coef, dtype=np.float64), "intercept": np.asarray(judge.intercept, dtype=np.float64),
              "classes": np.asarray(judge.classes, dtype=np.str_), "size": np.asarray(judge.size, dtype=np.int64),
              "max_value": np.asarray(judge.max_value, dtype=np.float64)}
    if judge.mean is not None:
        arrays["mean"], arrays["scale"] = np.asarray(judge.mean, np.float64), np.asarray(judge.scale, np.float64)
    if judge.test_accuracy is not None:
        arrays["test_accuracy"] = np.asarray(judge.test_accuracy, dtype=np.float64)
    write_npz(path, arrays)


def write_npz(path: str | Path, arrays: dict) -> None:
    """Write plain arrays as ``.npz`` (atomically): the one format of teal's judge files."""
    import numpy as np

    from ..runtime.files import atomic_output

    with atomic_output(path, binary=True) as f:
        np.savez(f, **arrays)


def read_npz(path: str | Path, required: tuple[str, ...], what: str = "judge file") -> dict:
    """The arrays of a judge ``.npz`` (never unpickles). Raises UsageError for a missing file,
    DataError naming the file for one that is not an ``.npz`` of plain arrays or lacks one of
    ``required``."""
    import zipfile

    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--judge {path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a judge file (.npz of plain arrays, no pickles): {exc}") from None
    missing = [k for k in required if k not in arrays]
    if missing:
        raise DataError(f"{path}: {what} lacks array(s) {', '.join(missing)}")
    return arrays


def load_judge(path: str | Path) -> LinearJudge:
    """Read a judge file (never unpickles); errors name the file and the array at fault."""
    import numpy as np

    path = Path(path)
    arrays = read_npz(path, ("coef", "intercept", "classes", "size", "max_value"))
    coef = arrays["coef"].astype(np.float64)
    intercept = arrays["intercept"].astype(np.float64).reshape(-1)
    classes = [str(c) for c in arrays["classes"].reshape(-1)]
    size = tuple(int(v) for v in arrays["size"].reshape(-1))
    if coef.ndim != 2 or len(size) != 2 or min(size) < 1 or coef.shape[1] != size[0] * size[1]:
        raise DataError(f"{path}: 'coef' must be [classes, height*width] for 'size' {list(size)}, got {list(coef.shape)}")
    if intercept.shape[0] != coef.shape[0] or len(classes) != coef.shape[0]:
        raise DataError(f"{path}: 'intercept' and 'classes' need {coef.shape[0]} entries (one per row of 'coef')")
    mean = scale = None
    if "mean" in arrays or "scale" in arrays:
        mean = arrays.get("mean", np.zeros(coef.shape[1])).astype(np.float64).reshape(-1)
        scale = arrays.get("scale", np.ones(coef.shape[1])).astype(np.float64).reshape(-1)
        if mean.shape[0] != coef.shape[1] or scale.shape[0] != coef.shape[1] or (scale == 0).any():
            raise DataError(f"{path}: 'mean' and 'scale' need {coef.shape[1]} entries, 'scale' none zero")
    acc = float(arrays["test_accuracy"]) if "test_accuracy" in arrays else None
    return LinearJudge(coef, intercept, classes, size, float(arrays["max_value"]), mean, scale, acc, name=str(path))
