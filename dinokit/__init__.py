"""The machinery behind the scripts and the core modules at the repository's root.

- `data`: reading images and masks, dataset descriptions, checking a dataset, augmentation, image sizes
- `backbones`: obtaining a DINOv2 backbone; Meta's released heads; patch-feature PCA
- `prediction`: what a prediction becomes: coloured masks, videos, ONNX files, the argmax
- `runs`: run bookkeeping: output folders, safe file writing, metric logs and figures, TensorBoard
- `training`: learning-rate schedules and the frozen-feature cache
- `classification`: image folders, embeddings and classifiers on them (classify.py)

Imports run one way: the package never imports a script or a root module other than the
pure-data `config.py` and `model_config.py` (tests/test_layout.py).
"""
