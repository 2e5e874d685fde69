"""Adversarial training (FGM) on the token embedding, in one line for `fit`.

Each training step becomes:

1. loss and gradients on the batch, as usual;
2. g = d loss / d E for the embedding matrix E, and delta = epsilon * g / ||g||;
3. loss and gradients again with E + delta in place of E;
4. the sum of both gradients is applied to the unperturbed weights.

The perturbed pass reads E + delta through a `keras.StatelessScope`, so the
embedding variable itself is never written: nothing needs restoring, and the
step stays valid under `tf.distribute` (where each replica perturbs with its own
gradient). Metrics and the reported loss come from the clean pass.

Example:

```python
model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
adversarial_training(model, "Embedding-Token", epsilon=0.5)
model.fit(x, y)
```
"""
import types

import keras
from keras import ops

from bert4keras.backend import backend_name

# Added to ||g|| so that a zero gradient gives a zero perturbation.
_NORM_EPSILON = 1e-8


def adversarial_training(model, embedding_name="Embedding-Token", epsilon=1.0):
    """Make `model.fit` train with FGM perturbations of an embedding matrix.

    Args:
        model: a `keras.Model` (compiled before or after this call).
        embedding_name: name of the layer that owns the matrix (its
            `embeddings` weight, or its only trainable weight); searched in
            nested models too.
        epsilon: size (L2 norm) of the perturbation, > 0.

    Returns:
        The same model, whose `train_step` now does adversarial training.
        Supported on the TensorFlow and JAX backends. The change lives on this
        model object only: it is not saved, so call this again after loading.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"`model` must be a keras.Model; received {model!r}.")
    if not (isinstance(epsilon, (int, float)) and epsilon > 0):
        raise ValueError(f"`epsilon` must be a number > 0; received {epsilon!r}.")
    embedding = _find_embedding(model, embedding_name)
    backend = backend_name()
    if backend == "tensorflow":
        step = _tensorflow_train_step
    elif backend == "jax":
        step = _jax_train_step
    else:
        raise NotImplementedError(
            f"adversarial_training supports the tensorflow and jax backends, "
            f"not {backend!r}."
        )

    def train_step(self, *args):
        return step(self, embedding, float(epsilon), *args)

    model.train_step = types.MethodType(train_step, model)
    model.train_function = None  # drop a step compiled before this call
    model.adversarial_config = {"embedding_name": embedding_name, "epsilon": epsilon}
    return model


def _find_embedding(model, name):
    layers = list(model._flatten_layers(include_self=False))
    matches = [layer for layer in layers if layer.name == name]
    if not matches:
        candidates = [layer.name for layer in layers if hasattr(layer, "embeddings")]
        raise ValueError(
            f"No layer named {name!r} in model {model.name!r}. Layers with an "
            f"embedding matrix: {candidates}. Pass one as `embedding_name`."
        )
    layer = matches[0]
    variable = getattr(layer, "embeddings", None)
    if variable is None:
        weights = layer.trainable_weights
        if len(weights) != 1:
            raise ValueError(
                f"Layer {name!r} has no `embeddings` attribute and "
                f"{len(weights)} trainable weights; cannot tell which to perturb."
            )
        variable = weights[0]
    return variable


def _index_in(variable, variables):
    for i, v in enumerate(variables):
        if v is variable:
            return i
    raise ValueError(
        f"The embedding {variable.path!r} is not trainable, so there is no "
        "gradient to perturb it with; unfreeze it or drop adversarial_training."
    )


def _perturbation(gradient, epsilon, dtype):
    gradient = ops.cast(ops.convert_to_tensor(gradient), "float32")
    norm = ops.sqrt(ops.sum(ops.square(gradient)))
    return ops.cast(epsilon * gradient / (norm + _NORM_EPSILON), dtype)


def _add_gradients(first, second):
    return [
        b if a is None else a if b is None else _add(a, b)
        for a, b in zip(first, second)
    ]


def _add(a, b):
    if backend_name() == "tensorflow":
        import tensorflow as tf

        if isinstance(a, tf.IndexedSlices) and isinstance(b, tf.IndexedSlices):
            # Stay sparse: repeated rows are summed when the update is applied.
            return tf.IndexedSlices(
                tf.concat([a.values, b.values], 0),
                tf.concat([a.indices, b.indices], 0),
                a.dense_shape,
            )
        return tf.convert_to_tensor(a) + tf.convert_to_tensor(b)
    return ops.add(a, b)


def _tensorflow_train_step(self, embedding, epsilon, data):
    import tensorflow as tf
    from keras.src.losses import loss as loss_module
    from keras.src.trainers.data_adapters import data_adapter_utils

    x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(data)
    kwargs = {"training": True} if self._call_has_training_arg else {}
    trainable = self.trainable_weights
    index = _index_in(embedding, trainable)

    with tf.GradientTape() as tape:
        y_pred = self(x, **kwargs)
        loss = self._compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
        )
        batch_size = tf.shape(next(i for i in tf.nest.flatten(x) if i is not None))[0]
        self._loss_tracker.update_state(
            loss_module.unscale_loss_for_distribution(loss), sample_weight=batch_size
        )
        loss = self.optimizer.scale_loss(loss)
    grads = tape.gradient(loss, trainable)

    # The gradient of a gather is an IndexedSlices: make it a dense matrix.
    gradient = tf.convert_to_tensor(grads[index])
    delta = tf.stop_gradient(_perturbation(gradient, epsilon, embedding.dtype))
    with tf.GradientTape() as tape:
        perturbed = ops.add(embedding.value, delta)
        with keras.StatelessScope(
            state_mapping=[(embedding, perturbed)], collect_losses=True
        ) as scope:
            y_adv = self(x, **kwargs)
            adv_loss = self._compute_loss(
                x=x, y=y, y_pred=y_adv, sample_weight=sample_weight, training=True
            )
            adv_loss = self.optimizer.scale_loss(adv_loss)
    adv_grads = tape.gradient(adv_loss, trainable)
    # Keep the perturbed pass's state updates (random seeds, batch statistics);
    # metric updates made inside the scope are dropped on purpose.
    for variable in self.non_trainable_variables:
        value = scope.get_current_value(variable)
        if value is not None:
            variable.assign(value)

    self.optimizer.apply_gradients(zip(_add_gradients(grads, adv_grads), trainable))
    return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)


def _jax_train_step(self, embedding, epsilon, state, data):
    import jax
    from keras.src.trainers.data_adapters import data_adapter_utils

    trainable, non_trainable, optimizer_vars, metrics_vars = state
    x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(data)
    index = _index_in(embedding, self.trainable_variables)
    grad_fn = jax.value_and_grad(self.compute_loss_and_updates, has_aux=True)

    (_, aux), grads = grad_fn(
        trainable, non_trainable, metrics_vars, x, y, sample_weight,
        training=True, optimizer_variables=optimizer_vars,
    )
    unscaled_loss, y_pred, non_trainable, clean_metrics_vars = aux

    perturbed = list(trainable)
    perturbed[index] = trainable[index] + _perturbation(
        grads[index], epsilon, embedding.dtype
    )
    (_, adv_aux), adv_grads = grad_fn(
        perturbed, non_trainable, metrics_vars, x, y, sample_weight,
        training=True, optimizer_variables=optimizer_vars,
    )
    non_trainable = adv_aux[2]

    trainable, optimizer_vars = self.optimizer.stateless_apply(
        optimizer_vars, _add_gradients(grads, adv_grads), trainable
    )
    logs, metrics_vars = self._update_metrics_variables(
        clean_metrics_vars, unscaled_loss, x, y, y_pred, sample_weight
    )
    return logs, (trainable, non_trainable, optimizer_vars, metrics_vars)
