"""Harmful-content classifiers: `score(texts) -> probabilities` that each text is NSFW / toxic.

`ProfanityClassifier` is the linear SVM shipped in `alt-profanity-check` (offline); `FastTextClassifier`
takes any fastText model a user trained or has (e.g. Dolma's Jigsaw NSFW / hate-speech models) and the
label that means harmful.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from scratchlm.errors import ScratchLMError


class HarmfulClassifier(Protocol):
    def score(self, texts: list[str]) -> list[float]: ...


class ProfanityClassifier:
    def __init__(self) -> None:
        try:
            from profanity_check import predict_prob
        except ImportError:
            raise ScratchLMError(
                'the profanity classifier needs alt-profanity-check: pip install "scratchlm[curate]"'
            ) from None
        self._predict = predict_prob

    def score(self, texts: list[str]) -> list[float]:
        return [float(p) for p in self._predict(texts)] if texts else []


class FastTextClassifier:
    def __init__(self, path: str | Path, harmful_label: str) -> None:
        if not Path(path).exists():
            raise ScratchLMError(f"harmful-content model not found: {path}")
        import fasttext

        self.model, self.label = fasttext.load_model(str(path)), f"__label__{harmful_label.removeprefix('__label__')}"

    def score(self, texts: list[str]) -> list[float]:
        scores = []
        for text in texts:
            labels, probs = self.model.predict(" ".join(text.split()), k=-1)
            scores.append(float(dict(zip(labels, probs, strict=True)).get(self.label, 0.0)))
        return scores


def load_classifier(name: str, path: str | None = None, label: str = "nsfw") -> HarmfulClassifier:
    """ "profanity" (the shipped model) or "fasttext" (with `path` and `label`)."""
    if name == "profanity":
        return ProfanityClassifier()
    if name == "fasttext":
        if not path:
            raise ScratchLMError("harmful.model = 'fasttext' needs harmful.path, the model file")
        return FastTextClassifier(path, label)
    raise ScratchLMError(f"harmful.model: expected 'profanity' or 'fasttext', got {name!r}")
