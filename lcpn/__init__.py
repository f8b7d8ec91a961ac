"""lcpn: hierarchical image classification with a Local Classifier per Parent Node."""

__version__ = "0.1.0"
