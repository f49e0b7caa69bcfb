"""Dataset builders (DFEW, MAFW, CREMA-D, RAVDESS, FERV39k: data/<name>/) and the preparation tools.

A package of the checkout, not installed with mma_dfer_jax: its commands run from the repository root as modules,
`python -m data.<name>.build`, `python -m data.extract_audio`, `python -m data.mafw_crop_faces`,
`python -m data.tfds_build data/<name>`. The builders share data/common.py, the tools data/tools.py.
"""
