"""granite-train: padding-free training for IBM Granite models."""

__version__ = "0.1.0"
