"""bert4keras: pretrained transformers for Keras 3."""
__version__ = "0.1.0"

from bert4keras import backend, layers  # noqa: F401  (registers serializable layers)
from bert4keras.models import build_transformer_model, save_weights_as_checkpoint  # noqa: F401
