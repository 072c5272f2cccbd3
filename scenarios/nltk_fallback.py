"""A local stand-in for NLTK's `punkt_tab` data, which no package registry ships.

HELM's BLEU (and a few other metrics) call `nltk.word_tokenize`, which needs the Punkt sentence
model `punkt_tab`; HELM tries `nltk.download` at import time, which fails offline. When the real
data is not installed we write a Punkt parameter set with no learned statistics plus a list of
common English abbreviations, so sentence splitting still works and BLEU-scored runs complete.
Scores can differ slightly from the trained model on text with unusual abbreviations.
"""

from __future__ import annotations

from pathlib import Path

COMMON_ABBREVIATIONS = (
    "mr mrs ms dr prof sr jr st vs etc e.g i.e inc ltd co corp jan feb mar apr jun jul aug sep sept oct "
    "nov dec no fig al approx dept est gen gov lt col sgt capt rev u.s u.k a.m p.m"
).split()


def ensure_punkt_tab(root: str | Path) -> str:
    """Make `nltk.word_tokenize` work offline; return 'installed' or the fallback folder used."""
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        return "installed"
    except LookupError:
        pass
    root = Path(root).resolve()
    english = root / "tokenizers" / "punkt_tab" / "english"
    english.mkdir(parents=True, exist_ok=True)
    files = {"collocations.tab": "", "sent_starters.txt": "", "ortho_context.tab": "",
             "abbrev_types.txt": "\n".join(COMMON_ABBREVIATIONS) + "\n"}
    for name, text in files.items():
        path = english / name
        if not path.exists():
            path.write_text(text)
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    return str(root)
