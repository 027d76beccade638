"""Model families behind the one interface (see ``lmlab.models.base``)."""

import importlib

from lmlab.models.base import (
    LanguageModel,
    State,
    build_model,
    families,
    load_model,
    save_model,
)

# Each family module registers itself on import; a missing optional module is skipped.
for _name in ("transformer", "masked", "ngram", "neural", "recurrent", "interpolate", "cache"):
    try:
        importlib.import_module(f"lmlab.models.{_name}")
    except ModuleNotFoundError as _e:
        if _e.name != f"lmlab.models.{_name}":
            raise

__all__ = ["LanguageModel", "State", "build_model", "families", "load_model", "save_model"]
