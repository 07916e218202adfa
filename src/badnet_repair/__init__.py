"""badnet-repair: fine-pruning repair of backdoored Keras classifiers, tracked in MLflow.

tensorflow-model-optimization only works with Keras 2, so the legacy Keras (tf_keras)
must be selected before TensorFlow is first imported anywhere in the process.
"""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

__version__ = "0.1.0"


class UserError(Exception):
    """A problem with the user's input or config: reported as one line, no traceback."""
