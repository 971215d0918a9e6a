"""ANNA-TF: convolutional neural networks that turn 1-D stellar spectra into atmospheric parameters.

The package is organised one module per stage, in the order data flows:
params (parameter file) -> packs / templates / fits_io (inputs) -> augment (noise) -> model -> train,
evaluate (anna-test) and infer (anna-infer).  Nothing here reads configuration at import time.
"""

__version__ = "0.1.0"
