"""The machinery behind the scripts and the core modules at the repository's root.

Two rules every part follows, at the package's root: `errors.py` (a user's mistake is a
`UserError`, reported as one line) and `writing.py` (every file is written atomically). Above them,
in layers (a folder imports only those below it):

- `data`: reading images and masks, dataset descriptions, checking a dataset, augmentation, image sizes
- `backbones`: obtaining a DINOv2 backbone; Meta's released heads; patch-feature PCA
- `prediction`: inference modes, coloured masks and overlays, videos, ONNX files, the one argmax
- `runs`: run bookkeeping: output folders and locks, metric logs and figures, TensorBoard
- `training`: learning-rate schedules and the frozen-feature cache
- `classification`: image folders, embeddings and classifiers on them (classify.py)

Imports run one way: the package never imports a script or a root module other than the
pure-data `config.py` and `model_config.py` (tests/test_layout.py).
"""
