"""bert4keras: pretrained transformers for Keras 3."""
__version__ = "0.1.0"

import os

# TensorFlow's default CPU allocator hands large buffers back to the OS after
# every op, so each training step page-faults its activations in afresh
# (measured: a third of the CPU time of the sentiment example in the kernel);
# its BFC allocator keeps and reuses them (1.6x faster end to end). TensorFlow
# reads this when it first allocates, so it works even if keras came first;
# set TF_CPU_ALLOCATOR_USE_BFC=false to keep the default.
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")

# Importing the modules registers every layer, loss, schedule and optimizer
# with Keras serialization, so `keras.models.load_model` needs only
# `import bert4keras`.
from bert4keras import backend, heads, layers, losses, optimizers  # noqa: F401
from bert4keras.models import build_transformer_model, save_weights_as_checkpoint  # noqa: F401
