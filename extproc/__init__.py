"""extproc: an Envoy external-processing sidecar that meters and governs OpenAI API spend."""

from extproc import compiled as _compiled

__version__ = "0.1.0"

# Before any module of the request path is imported: run its compiled build only when that
# build matches the sources (extproc/compiled.py).
_compiled.guard()
