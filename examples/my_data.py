"""A user's own data for psfw: ``load(**options)`` returns the arrays.

Put any reader here (Parquet, Arrow, CSV, an image folder): psfw needs a dict of
numpy arrays ``x_train``, ``y_train`` and optionally ``x_test``, ``y_test`` (else
``data.test_fraction`` of the rows is held out). Named from a config as
``[data] module = "my_data.py"``, with ``options`` passed to ``load``.

This one reads scikit-learn's wine recognition set (178 wines, 13 chemical
measurements, 3 cultivars) and standardizes the measurements (over all rows, for
brevity: a careful reader would use the training rows' mean and deviation).
"""

import numpy as np
from sklearn.datasets import load_wine


def load(standardize: bool = True) -> dict[str, np.ndarray]:
    data = load_wine()
    x = data.data.astype(np.float32)
    if standardize:
        x = (x - x.mean(axis=0)) / x.std(axis=0)
    return {"x_train": x, "y_train": data.target.astype(np.int32)}
