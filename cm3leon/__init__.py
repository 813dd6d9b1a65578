"""cm3leon: a thin CM3Leon-style model, tokenizers, data, training and generation on cm3leon_kernels."""
__version__ = "0.1.0"
