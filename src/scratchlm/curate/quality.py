"""A quality classifier the user trains: positives from reference-quality text (e.g. the corpora in
`../shared/data/corpora/`), negatives from raw crawl text; a linear model over hashed word unigrams and
bigrams (scikit-learn's `HashingVectorizer` + logistic regression), the same family as fastText's
classifiers. Saved as `weights.npz` + `classifier.json` (loading runs no code, unlike a pickle).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from scratchlm.atomic import atomic_directory
from scratchlm.errors import ScratchLMError

N_FEATURES = 2**18
CHUNK_CHARS = 2000  # training texts are cut into pieces of about this size, like the documents scored


def _vectorizer():
    try:
        from sklearn.feature_extraction.text import HashingVectorizer
    except ImportError:
        raise ScratchLMError('the quality classifier needs scikit-learn: pip install "scratchlm[curate]"') from None
    return HashingVectorizer(n_features=N_FEATURES, ngram_range=(1, 2), alternate_sign=False, norm="l2", lowercase=True)


def chunks(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """Pieces of about `size` characters, cut at line breaks."""
    pieces, current, length = [], [], 0
    for line in text.splitlines():
        current.append(line)
        length += len(line) + 1
        if length >= size:
            pieces.append("\n".join(current))
            current, length = [], 0
    if current and length > size // 4:
        pieces.append("\n".join(current))
    return pieces


class QualityClassifier:
    def __init__(self, coef: np.ndarray, intercept: float) -> None:
        self.coef, self.intercept, self.vectorizer = coef.astype(np.float64), float(intercept), _vectorizer()

    @classmethod
    def train(cls, positives: list[str], negatives: list[str], c: float = 4.0) -> QualityClassifier:
        from sklearn.linear_model import LogisticRegression

        if not positives or not negatives:
            raise ScratchLMError("the quality classifier needs both positive and negative texts")
        x = _vectorizer().transform(positives + negatives)
        y = np.r_[np.ones(len(positives)), np.zeros(len(negatives))]
        model = LogisticRegression(C=c, max_iter=1000, class_weight="balanced").fit(x, y)
        return cls(model.coef_[0], model.intercept_[0])

    def score(self, texts: list[str]) -> np.ndarray:
        """P(high quality) for each text."""
        if not texts:
            return np.zeros(0)
        logits = self.vectorizer.transform(texts) @ self.coef + self.intercept
        return 1.0 / (1.0 + np.exp(-logits))

    def save(self, directory: str | Path) -> Path:
        with atomic_directory(directory, owned=("weights.npz", "classifier.json")) as tmp:
            np.savez(tmp / "weights.npz", coef=self.coef, intercept=np.array([self.intercept]))
            settings = {"kind": "hashed-ngram-logistic", "n_features": N_FEATURES, "ngram_range": [1, 2]}
            (tmp / "classifier.json").write_text(json.dumps(settings) + "\n", encoding="utf-8")
        return Path(directory)

    @classmethod
    def load(cls, directory: str | Path) -> QualityClassifier:
        path = Path(directory) / "weights.npz"
        if not path.exists():
            raise ScratchLMError(f"quality classifier not found: {path} (train one with scratchlm curate-quality)")
        with np.load(path, allow_pickle=False) as weights:
            coef, intercept = weights["coef"], float(weights["intercept"][0])
        if coef.shape != (N_FEATURES,):
            raise ScratchLMError(f"{path}: coef has shape {coef.shape}; expected ({N_FEATURES},)")
        return cls(coef, intercept)
