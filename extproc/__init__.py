"""extproc: an Envoy external-processing sidecar that meters and governs OpenAI API spend."""

__version__ = "0.1.0"
