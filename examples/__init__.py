"""Example KS models in plain PyTorch and the ksfx demo."""
