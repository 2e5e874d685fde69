"""bert4keras: pretrained transformers for Keras 3."""
__version__ = "0.1.0"

# Importing the modules registers every layer, loss, schedule and optimizer
# with Keras serialization, so `keras.models.load_model` needs only
# `import bert4keras`.
from bert4keras import backend, heads, layers, losses, optimizers  # noqa: F401
from bert4keras.models import build_transformer_model, save_weights_as_checkpoint  # noqa: F401
