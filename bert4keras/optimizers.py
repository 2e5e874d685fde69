"""Optimizer extensions in the bert4keras style, on top of Keras 3 optimizers.

Each `extend_with_*` function takes an optimizer class and returns a subclass
with one more feature; the features compose, so BERT's pretraining optimizer is

```python
from bert4keras.optimizers import (
    Adam, extend_with_gradient_accumulation, extend_with_layer_adaptation,
    extend_with_piecewise_linear_lr, extend_with_weight_decay)

AdamW = extend_with_weight_decay(Adam, name="AdamW")
LAMB = extend_with_layer_adaptation(AdamW, name="LAMB")
LAMBLR = extend_with_piecewise_linear_lr(LAMB, name="LAMBLR")
LAMBLRGA = extend_with_gradient_accumulation(LAMBLR, name="LAMBLRGA")
optimizer = LAMBLRGA(
    learning_rate=1e-3, weight_decay_rate=0.01,
    exclude_from_weight_decay=["Norm", "bias"],
    exclude_from_layer_adaptation=["Norm", "bias"],
    lr_schedule={1000: 1.0, 10000: 0.1}, grad_accum_steps=4)
```

Any Keras optimizer class can be extended (`keras.optimizers.SGD`, `Lion`,
...). What Keras 3 gives natively is used as is: the update rules, clipping,
loss scaling, learning-rate schedules and Keras' own `weight_decay`. These are
done here instead:

* Gradient accumulation and EMA. Keras' own versions wrap the update in an
  `ops.cond`; under `tf.distribute.MirroredStrategy` the update inside it needs
  a `merge_call`, which TensorFlow refuses inside a cond (RuntimeError). Here
  the gradients are summed over replicas first and the conditional update runs
  in cross-replica context, where a cond may hold per-device updates. Keras'
  EMA also advances on every micro-batch when accumulating, and overwrites the
  model with the average at the end of `fit`; the EMA here advances once per
  real update and swaps weights only when asked (`apply_ema_weights`).
* Exclusion lists (`exclude_from_weight_decay`, ...) are regular expressions
  searched in the variable's full path (`"Transformer-0-FeedForward-Norm/gamma"`),
  not only its short name (`"gamma"`), so layer names can be used.
* Sparse gradients. On TF an embedding's gradient lists a row per token, so a
  repeated token repeats its row, and Keras' Adam then adds squared rows
  instead of squaring their sum. Every class here (and `Adam`) sums repeated
  rows first, which makes the update equal the dense one.
* `AdaFactor`: Keras' `Adafactor` keeps a full-size second-moment variable per
  weight, so it saves no memory; the one here stores only the factored row and
  column statistics, and has bert4keras' arguments (`beta1`,
  `min_dim_size_to_factor`, ...).

Step counting: `optimizer.iterations` counts real updates (with accumulation,
micro-batches // `grad_accum_steps`), and learning-rate schedules are evaluated
at that count, so accumulating k batches of size b follows the same schedule as
training on batches of size k*b.

Classes made by `extend_with_*` are registered for Keras serialization under
their `name`; a saved model whose optimizer is such a class loads once the same
`extend_with_*` call has run (the predefined `AdamW`, `AdamLR`, `AdamGA`,
`AdamLA`, `AdamEMA`, `LAMB` are registered on import).
"""
import re

import keras
import numpy as np
from keras import ops

from bert4keras.backend import backend_name

_PACKAGE = "bert4keras"
LearningRateSchedule = keras.optimizers.schedules.LearningRateSchedule


def _is_tensorflow():
    return backend_name() == "tensorflow"


if _is_tensorflow():
    import tensorflow as tf


# ---------------------------------------------------------------------------
# Learning-rate schedule
# ---------------------------------------------------------------------------


def _normalize_knots(lr_schedule):
    """{step: multiplier} (keys may be strings after JSON) -> sorted pairs."""
    if isinstance(lr_schedule, dict):
        items = list(lr_schedule.items())
    elif isinstance(lr_schedule, (list, tuple)):
        items = [tuple(pair) for pair in lr_schedule]
    else:
        raise ValueError(
            "`lr_schedule` must be a dict {step: multiplier}, e.g. "
            f"{{1000: 1.0, 2000: 0.1}}. Received: {lr_schedule!r}"
        )
    if not items:
        raise ValueError("`lr_schedule` is empty; give at least one knot.")
    knots = []
    for step, value in items:
        try:
            step_int = int(step)
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(
                "`lr_schedule` maps integer steps to numbers; received the "
                f"pair {step!r}: {value!r}."
            ) from None
        if step_int < 0 or step_int != float(step):
            raise ValueError(
                f"`lr_schedule` steps must be non-negative integers; got {step!r}."
            )
        knots.append((step_int, value))
    knots.sort()
    if len({step for step, _ in knots}) != len(knots):
        raise ValueError(f"`lr_schedule` has a repeated step: {lr_schedule!r}")
    return knots


@keras.saving.register_keras_serializable(package=_PACKAGE)
class PiecewiseLinearSchedule(LearningRateSchedule):
    """`learning_rate` times a piecewise-linear multiplier of the step.

    `lr_schedule` maps steps to multipliers. Between two knots the multiplier
    is interpolated linearly, after the last knot it stays at the last value,
    and when no knot is at step 0 the schedule starts from 0 (a warmup).
    `{1000: 1, 2000: 0.1}` warms up from 0 to 1 over 1000 steps, decays to
    0.1 at step 2000 and stays there.

    Example:

    ```python
    schedule = PiecewiseLinearSchedule(1e-3, {1000: 1.0, 2000: 0.1})
    float(schedule(500))  # 5e-4
    optimizer = keras.optimizers.Adam(learning_rate=schedule)
    ```

    `learning_rate` may itself be a `LearningRateSchedule`; both are then
    evaluated at the same step and multiplied.
    """

    def __init__(self, learning_rate, lr_schedule):
        if isinstance(learning_rate, dict):
            learning_rate = keras.saving.deserialize_keras_object(learning_rate)
        if not isinstance(learning_rate, LearningRateSchedule):
            learning_rate = float(learning_rate)
        self.learning_rate = learning_rate
        self.knots = _normalize_knots(lr_schedule)
        # Without a knot at step 0 the schedule starts from 0.
        start = [] if self.knots[0][0] == 0 else [(0, 0.0)]
        self._points = start + self.knots

    @property
    def lr_schedule(self):
        return {step: value for step, value in self.knots}

    def multiplier(self, step):
        step = ops.cast(step, "float32")
        points = self._points
        value = ops.full_like(step, points[-1][1])
        for (t0, v0), (t1, v1) in zip(points, points[1:]):
            slope = (v1 - v0) / (t1 - t0)
            inside = ops.logical_and(step >= t0, step < t1)
            value = ops.where(inside, v0 + slope * (step - t0), value)
        return value

    def __call__(self, step):
        base = self.learning_rate
        if isinstance(base, LearningRateSchedule):
            base = ops.cast(base(step), "float32")
        return base * self.multiplier(step)

    def get_config(self):
        learning_rate = self.learning_rate
        if isinstance(learning_rate, LearningRateSchedule):
            learning_rate = keras.saving.serialize_keras_object(learning_rate)
        # Pairs rather than a dict: JSON would turn integer keys into strings.
        return {
            "learning_rate": learning_rate,
            "lr_schedule": [[step, value] for step, value in self.knots],
        }


# ---------------------------------------------------------------------------
# Shared plumbing
# ---------------------------------------------------------------------------


def _compile_patterns(patterns, argument):
    """None / str / list of str -> list of compiled regular expressions."""
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    if not isinstance(patterns, (list, tuple)) or not all(
        isinstance(p, str) for p in patterns
    ):
        raise ValueError(
            f"`{argument}` must be a list of strings (regular expressions "
            f"searched in variable paths), e.g. ['Norm', 'bias']. "
            f"Received: {patterns!r}"
        )
    return [re.compile(p) for p in patterns]


def _read(variable):
    """A snapshot of a (Keras or backend) variable's current value.

    On TF, `ops.convert_to_tensor` returns a tf.Variable unchanged (it counts
    as a tensor), and on PyTorch the variable's own storage, which `assign`
    overwrites in place; so later arithmetic would see later writes. Read it
    now (JAX arrays are immutable; the copy costs nothing under jit).
    """
    if _is_tensorflow():
        return tf.identity(_unwrap(variable))
    return ops.copy(ops.convert_to_tensor(variable))


def _dense(gradient):
    """Embedding gradients are tf.IndexedSlices on TF; accumulators are dense."""
    if _is_tensorflow() and isinstance(gradient, tf.IndexedSlices):
        return tf.convert_to_tensor(gradient)
    return gradient


def _sum_repeated_rows(gradient):
    """Merge the repeated rows of a TF sparse gradient.

    An embedding's gradient on TF is an IndexedSlices with one row per token,
    so a token seen twice appears twice. Keras' Adam squares the rows before
    adding them up (sum of squares instead of square of the sum), which gives a
    wrong second moment; summing the rows first makes the update equal the
    dense one.
    """
    if _is_tensorflow() and isinstance(gradient, tf.IndexedSlices):
        rows, positions = tf.unique(gradient.indices)
        values = tf.math.unsorted_segment_sum(
            gradient.values, positions, tf.shape(rows)[0]
        )
        return tf.IndexedSlices(values, rows, gradient.dense_shape)
    return gradient


def _unwrap(value):
    """Keras variable -> backend variable (a tf.Variable on TensorFlow)."""
    return value.value if isinstance(value, keras.Variable) else value


class _OptimizerExtension:
    """Helpers shared by all extensions; not an optimizer by itself."""

    def _model_variable(self, variable):
        # `update_step` may receive a backend variable (on TF, a per-device
        # component); map it back to the Keras variable the optimizer was
        # built with.
        return self._trainable_variables[self._get_variable_index(variable)]

    def _variable_path(self, variable):
        model_variable = self._model_variable(variable)
        return getattr(model_variable, "path", model_variable.name)

    def _path_matches(self, patterns, variable):
        path = self._variable_path(variable)
        return any(p.search(path) for p in patterns)

    def update_step(self, gradient, variable, learning_rate):
        # Runs just before the base optimizer's rule, after any all-reduce
        # (which would concatenate the replicas' rows again).
        gradient = _sum_repeated_rows(gradient)
        return super().update_step(gradient, variable, learning_rate)

    def _get_current_learning_rate(self):
        # Schedules see real updates, not micro-batches (see module docstring).
        if isinstance(self._learning_rate, LearningRateSchedule):
            return self._learning_rate(self.iterations)
        return super()._get_current_learning_rate()


_EXTENSION_NAMES = {}


def _extend(base, mixin, name, default_suffix):
    """`class name(mixin, base)`, registered for Keras serialization."""
    if not (isinstance(base, type) and issubclass(base, keras.optimizers.Optimizer)):
        raise TypeError(
            "Pass an optimizer class, e.g. keras.optimizers.Adam (the class, "
            f"not an instance). Received: {base!r}"
        )
    if issubclass(base, mixin):
        raise ValueError(
            f"{base.__name__} already has {_EXTENSION_NAMES[mixin]}; "
            "extending twice with the same feature is not supported."
        )
    name = name or f"{base.__name__}{default_suffix}"
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"`name` must be a valid class name; got {name!r}.")
    doc = (
        f"{base.__name__} with {_EXTENSION_NAMES[mixin]} "
        f"(made by bert4keras.optimizers).\n\n{mixin.__doc__ or ''}"
    )
    cls = type(name, (mixin, base), {"__module__": __name__, "__doc__": doc})
    return keras.saving.register_keras_serializable(package=_PACKAGE, name=name)(
        cls
    )


# ---------------------------------------------------------------------------
# Per-variable extensions: they wrap `update_step`, so the wrapping order is
# the order of application (the outermost extension sees the inner ones'
# complete step).
# ---------------------------------------------------------------------------


class _WeightDecay(_OptimizerExtension):
    """Decoupled weight decay: after the base step, w -= lr * rate * w_old.

    Args:
        weight_decay_rate: float >= 0, the decay rate (default 0.01).
        exclude_from_weight_decay: list of regular expressions; variables whose
            path matches one (e.g. `"Norm"`, `"bias"`) are not decayed.
    """

    def __init__(
        self, *args, weight_decay_rate=0.01, exclude_from_weight_decay=None, **kwargs
    ):
        patterns = _compile_patterns(
            exclude_from_weight_decay, "exclude_from_weight_decay"
        )
        if not weight_decay_rate >= 0:
            raise ValueError(
                f"`weight_decay_rate` must be >= 0; got {weight_decay_rate!r}."
            )
        super().__init__(*args, **kwargs)
        self.weight_decay_rate = float(weight_decay_rate)
        self._weight_decay_patterns = patterns

    def _decays(self, variable):
        return self.weight_decay_rate > 0 and not self._path_matches(
            self._weight_decay_patterns, variable
        )

    def _inner_step_ignores_weights(self):
        """Whether the update rule inside this extension never reads w.

        Then w - step - lr*rate*w == (w - lr*rate*w) - step, and decaying
        first needs no copy of the old weights (on TF a copy of each weight
        plus two more passes over it). The inner classes that define
        `update_step` are checked against the rules known to qualify; anything
        else (LAMB's trust ratio, AdaFactor's parameter scale, a user's
        subclass) gets the general form.
        """
        mro = type(self).__mro__
        for cls in mro[mro.index(_WeightDecay) + 1:]:
            if "update_step" not in cls.__dict__ or cls in _STEPS_BLIND_TO_WEIGHTS:
                continue
            return cls in _RULES_BLIND_TO_WEIGHTS
        return False

    def update_step(self, gradient, variable, learning_rate):
        if not self._decays(variable):
            return super().update_step(gradient, variable, learning_rate)
        rate = ops.cast(learning_rate, variable.dtype) * self.weight_decay_rate
        if self._inner_step_ignores_weights():
            self.assign(variable, ops.multiply(variable, 1 - rate))
            return super().update_step(gradient, variable, learning_rate)
        old = _read(variable)
        super().update_step(gradient, variable, learning_rate)
        self.assign_sub(variable, ops.multiply(rate, old))

    def get_config(self):
        config = super().get_config()
        config["weight_decay_rate"] = self.weight_decay_rate
        config["exclude_from_weight_decay"] = [
            p.pattern for p in self._weight_decay_patterns
        ]
        return config


class _LayerAdaptation(_OptimizerExtension):
    """Layer-wise adaptation (LAMB's trust ratio) around any optimizer.

    The base step `delta` (including weight decay when the weight-decay
    extension is inside this one) is rescaled so that its size is
    `learning_rate * ||w||`: w <- w + delta * ||w|| / ||delta / lr||. Variables
    with a zero norm or a vanishing step keep the plain step.

    Args:
        exclude_from_layer_adaptation: list of regular expressions; variables
            whose path matches one keep the plain step.
    """

    def __init__(self, *args, exclude_from_layer_adaptation=None, **kwargs):
        patterns = _compile_patterns(
            exclude_from_layer_adaptation, "exclude_from_layer_adaptation"
        )
        super().__init__(*args, **kwargs)
        self._layer_adaptation_patterns = patterns

    def update_step(self, gradient, variable, learning_rate):
        if self._path_matches(self._layer_adaptation_patterns, variable):
            return super().update_step(gradient, variable, learning_rate)
        old = _read(variable)
        super().update_step(gradient, variable, learning_rate)
        delta = ops.subtract(_read(variable), old)
        eps = keras.config.epsilon()
        lr = ops.maximum(ops.cast(learning_rate, variable.dtype), eps)
        weight_norm = ops.norm(ops.reshape(old, (-1,)))
        step_norm = ops.norm(ops.reshape(delta / lr, (-1,)))
        usable = ops.logical_and(weight_norm > 0, step_norm > eps)
        ratio = ops.where(
            usable, weight_norm / ops.where(usable, step_norm, 1.0), 1.0
        )
        self.assign(variable, ops.add(old, ops.multiply(delta, ratio)))

    def get_config(self):
        config = super().get_config()
        config["exclude_from_layer_adaptation"] = [
            p.pattern for p in self._layer_adaptation_patterns
        ]
        return config


class _ParameterWiseLR(_OptimizerExtension):
    """Per-variable learning-rate multipliers.

    Args:
        paramwise_lr_schedule: dict {regular expression: multiplier}. The step
            of a variable whose path matches patterns is multiplied by the
            product of their multipliers (`{"Embedding": 0.1}` trains
            embeddings 10x slower).
    """

    def __init__(self, *args, paramwise_lr_schedule=None, **kwargs):
        schedule = paramwise_lr_schedule or {}
        if not isinstance(schedule, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, float))
            for k, v in schedule.items()
        ):
            raise ValueError(
                "`paramwise_lr_schedule` must be a dict {pattern: multiplier}, "
                f"e.g. {{'Embedding': 0.1}}. Received: {paramwise_lr_schedule!r}"
            )
        super().__init__(*args, **kwargs)
        self.paramwise_lr_schedule = {k: float(v) for k, v in schedule.items()}
        self._paramwise_patterns = [
            (re.compile(k), v) for k, v in self.paramwise_lr_schedule.items()
        ]

    def _lr_multiplier(self, variable):
        path = self._variable_path(variable)
        multiplier = 1.0
        for pattern, value in self._paramwise_patterns:
            if pattern.search(path):
                multiplier *= value
        return multiplier

    def update_step(self, gradient, variable, learning_rate):
        multiplier = self._lr_multiplier(variable)
        if multiplier == 1.0:
            return super().update_step(gradient, variable, learning_rate)
        # Scaling the step rather than the learning rate keeps the meaning for
        # optimizers whose step is not proportional to the learning rate.
        old = _read(variable)
        super().update_step(gradient, variable, learning_rate)
        delta = ops.subtract(_read(variable), old)
        self.assign(variable, ops.add(old, ops.multiply(delta, multiplier)))

    def get_config(self):
        config = super().get_config()
        config["paramwise_lr_schedule"] = dict(self.paramwise_lr_schedule)
        return config


class _PiecewiseLinearLR(_OptimizerExtension):
    """Learning rate times a piecewise-linear schedule of the update count.

    Args:
        lr_schedule: dict {step: multiplier}, see `PiecewiseLinearSchedule`
            (e.g. `{1000: 1, 2000: 0.1}`: warmup to 1000, decay to 0.1 by 2000).
    """

    def __init__(self, *args, lr_schedule=None, **kwargs):
        if lr_schedule is None:
            raise ValueError(
                "`lr_schedule` is required, e.g. lr_schedule={1000: 1.0, 2000: 0.1}."
            )
        knots = _normalize_knots(lr_schedule)
        given = kwargs.get("learning_rate", args[0] if args else None)
        super().__init__(*args, **kwargs)
        base = self._learning_rate
        if isinstance(given, (int, float)):
            base = float(given)  # exactly as given, not through a float32 variable
        elif isinstance(base, keras.Variable):
            # The base class default: float32's shortest repr gives back e.g. 0.001.
            base = float(str(np.float32(ops.convert_to_numpy(base))))
        elif not isinstance(base, LearningRateSchedule):
            raise ValueError(
                "extend_with_piecewise_linear_lr needs a float learning_rate or "
                f"a LearningRateSchedule; received {base!r}."
            )
        # The setter untracks the learning-rate variable the base created.
        self.learning_rate = PiecewiseLinearSchedule(base, knots)

    @property
    def lr_schedule(self):
        return self._learning_rate.lr_schedule

    def get_config(self):
        config = super().get_config()
        schedule = self._learning_rate
        config["learning_rate"] = schedule.get_config()["learning_rate"]
        config["lr_schedule"] = [list(k) for k in schedule.knots]
        return config


# ---------------------------------------------------------------------------
# Step-level extensions (gradient accumulation, EMA, lookahead). They share one
# `_backend_apply_gradients`, written once for every backend:
#
#   replica context:  sum gradients over replicas, add the accumulators,
#                     average, clip                      (pure tensor math)
#   cross-replica:    if this is an update step: weight decay, base update,
#                     hooks (lookahead, EMA); store/reset accumulators.
#
# "Cross-replica" is a TF `merge_call`; other backends just call the function.
# Conditional updates are `tf.cond` on TF and compute-then-select elsewhere
# (JAX traces both branches anyway and variables are immutable values there).
# ---------------------------------------------------------------------------


class _StepControl(_OptimizerExtension):
    _accumulation_steps = 1

    def __init__(self, *args, **kwargs):
        if kwargs.get("use_ema"):
            raise ValueError(
                "Keras' `use_ema=True` cannot be combined with the bert4keras "
                "step extensions; use extend_with_exponential_moving_average "
                "(its `ema_momentum` argument) instead."
            )
        if kwargs.get("gradient_accumulation_steps"):
            raise ValueError(
                "Keras' `gradient_accumulation_steps` cannot be combined with "
                "the bert4keras step extensions; use "
                "extend_with_gradient_accumulation (`grad_accum_steps`) instead."
            )
        super().__init__(*args, **kwargs)

    @property
    def iterations(self):
        if self._accumulation_steps == 1:
            return self._iterations
        return ops.floor_divide(self._iterations, self._accumulation_steps)

    # Hooks, chained with super(): extensions act innermost first.
    def _before_update(self, variables):
        pass

    def _after_update(self, variables):
        pass

    # --- backend primitives -------------------------------------------------

    def _sum_over_replicas(self, grads, variables):
        if _is_tensorflow() and tf.distribute.has_strategy():
            if not tf.distribute.in_cross_replica_context():
                pairs = self._all_reduce_sum_gradients(list(zip(grads, variables)))
                return [g for g, _ in pairs]
        return grads

    def _run_in_cross_replica_context(self, fn, *args):
        if _is_tensorflow() and not tf.distribute.in_cross_replica_context():
            context = tf.distribute.get_replica_context()
            return context.merge_call(lambda _, *a: fn(*a), args=args)
        return fn(*args)

    def _update_variable(self, variable, fn, *args):
        """variable <- fn(variable, *args), per device on TF."""
        if _is_tensorflow():
            strategy = tf.distribute.get_strategy()
            strategy.extended.update(
                _unwrap(variable),
                lambda v, *a: v.assign(ops.cast(fn(v, *a), v.dtype)),
                args=tuple(_unwrap(a) for a in args),
                group=False,
            )
        else:
            variable.assign(fn(variable, *args))

    def _run_if(self, condition, fn):
        """Run the variable updates of `fn` only where `condition` holds."""
        if _is_tensorflow():
            tf.cond(condition, lambda: fn(), lambda: None)
            return
        state = list(self._trainable_variables) + self.variables
        copy = (lambda x: x) if backend_name() == "jax" else ops.copy
        before = [copy(v.value) for v in state]
        fn()
        for variable, old in zip(state, before):
            new = variable.value
            if new is not old:
                variable.assign(ops.where(condition, new, old))

    def _apply_base_update(self, grads, variables, learning_rate):
        if _is_tensorflow():
            pairs = [(g, _unwrap(v)) for g, v in zip(grads, variables)]
            self._distributed_tf_update_step(
                tf.distribute.get_strategy(), pairs, learning_rate
            )
        else:
            self._backend_update_step(grads, variables, learning_rate)

    # --- the step -----------------------------------------------------------

    def _backend_apply_gradients(self, grads, trainable_variables):
        variables = list(trainable_variables)
        grads = self._sum_over_replicas(list(grads), variables)
        totals = None
        steps = self._accumulation_steps
        if steps > 1:
            accumulators = self._accumulators_for(variables)
            totals = [
                ops.add(_dense(g), a) for g, a in zip(grads, accumulators)
            ]
            grads = [ops.divide(t, ops.cast(steps, t.dtype)) for t in totals]
        grads = self._clip_gradients(grads)
        self._run_in_cross_replica_context(
            lambda g, t: self._update_or_accumulate(g, t, variables), grads, totals
        )

    def _accumulators_for(self, variables):
        return [self._accumulators[self._get_variable_index(v)] for v in variables]

    def _update_or_accumulate(self, grads, totals, variables):
        steps = self._accumulation_steps
        if steps == 1:
            self._update(grads, variables)
            return
        is_update = ops.equal(ops.mod(self._iterations + 1, steps), 0)
        self._run_if(is_update, lambda: self._update(grads, variables))
        for accumulator, total in zip(self._accumulators_for(variables), totals):
            self._update_variable(
                accumulator,
                lambda _, t: ops.where(is_update, ops.zeros_like(t), t),
                total,
            )

    def _update(self, grads, variables):
        self._before_update(variables)
        learning_rate = self.learning_rate
        if self.weight_decay is not None:  # Keras' own `weight_decay` argument
            for variable in variables:
                if self._use_weight_decay(variable):
                    self._update_variable(
                        variable,
                        lambda v: v
                        - v
                        * ops.cast(self.weight_decay, v.dtype)
                        * ops.cast(learning_rate, v.dtype),
                    )
        self._apply_base_update(grads, variables, learning_rate)
        self._after_update(variables)


class _GradientAccumulation(_StepControl):
    """Gradient accumulation: update once every `grad_accum_steps` batches.

    The gradients of `grad_accum_steps` consecutive batches are averaged and
    applied as one update, the same update as one batch of
    `grad_accum_steps` times the size (for a mean-reduced loss).
    `optimizer.iterations` counts updates.

    Args:
        grad_accum_steps: int >= 1, batches per update.
    """

    def __init__(self, *args, grad_accum_steps=None, **kwargs):
        if (
            isinstance(grad_accum_steps, bool)
            or not isinstance(grad_accum_steps, (int, np.integer))
            or grad_accum_steps < 1
        ):
            raise ValueError(
                "`grad_accum_steps` must be an integer >= 1 (batches per "
                f"update); received {grad_accum_steps!r}."
            )
        super().__init__(*args, **kwargs)
        self.grad_accum_steps = int(grad_accum_steps)
        self._accumulation_steps = int(grad_accum_steps)

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self._accumulators = self.add_optimizer_variables(
            variables, "grad_accumulator"
        )

    def get_config(self):
        config = super().get_config()
        config["grad_accum_steps"] = self.grad_accum_steps
        return config


class _ExponentialMovingAverage(_StepControl):
    """Exponential moving average of the weights, swapped in on demand.

    After every update `ema <- m * ema + (1 - m) * w`, starting from zero.
    `apply_ema_weights()` saves the current weights and loads the (bias
    corrected) averages into the model; `reset_old_weights()` puts the saved
    weights back, e.g. around an evaluation in a callback.

    Args:
        ema_momentum: float in [0, 1), the decay `m` (default 0.999).
    """

    def __init__(self, *args, ema_momentum=0.999, **kwargs):
        if not 0 <= ema_momentum < 1:
            raise ValueError(
                f"`ema_momentum` must be in [0, 1); received {ema_momentum!r}."
            )
        super().__init__(*args, **kwargs)
        self.ema_momentum = float(ema_momentum)
        self._weights_before_ema = None

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self._ema_weights = self.add_optimizer_variables(variables, "ema")

    def _after_update(self, variables):
        super()._after_update(variables)
        momentum = self.ema_momentum
        for weight, average in zip(self._trainable_variables, self._ema_weights):
            if average is not None:
                self._update_variable(
                    average, lambda e, w: e * momentum + w * (1 - momentum), weight
                )

    @property
    def ema_weights(self):
        """The raw moving averages (no bias correction), as numpy arrays."""
        self._check_built("ema_weights")
        return [
            None if e is None else ops.convert_to_numpy(e) for e in self._ema_weights
        ]

    def _check_built(self, what):
        if not self.built:
            raise ValueError(
                f"`{what}` needs a built optimizer: train first (model.fit or "
                "optimizer.apply) so that the averages exist."
            )

    def apply_ema_weights(self, bias_correction=True):
        """Load the moving averages into the model, keeping the current weights.

        With `bias_correction` the averages are divided by 1 - m^n (n updates
        so far), which undoes their start from zero.
        """
        self._check_built("apply_ema_weights()")
        if self._weights_before_ema is not None:
            raise ValueError(
                "EMA weights are already applied; call reset_old_weights() "
                "before applying them again."
            )
        updates = int(ops.convert_to_numpy(self.iterations))
        if updates == 0:
            raise ValueError("No update has been made yet, so there is no average.")
        scale = 1.0 - self.ema_momentum**updates if bias_correction else 1.0
        self._weights_before_ema = [
            np.array(ops.convert_to_numpy(w)) for w in self._trainable_variables
        ]
        for weight, average in zip(self._trainable_variables, self._ema_weights):
            if average is not None:
                value = ops.convert_to_numpy(average).astype("float64") / scale
                weight.assign(value.astype(weight.dtype))

    def reset_old_weights(self):
        """Restore the weights saved by `apply_ema_weights()`, exactly."""
        if self._weights_before_ema is None:
            raise ValueError("Call apply_ema_weights() before reset_old_weights().")
        for weight, old in zip(self._trainable_variables, self._weights_before_ema):
            weight.assign(old)
        self._weights_before_ema = None

    def get_config(self):
        config = super().get_config()
        config["ema_momentum"] = self.ema_momentum
        return config


class _Lookahead(_StepControl):
    """Lookahead: every `steps_per_slow_update` updates, pull the weights back.

    Slow weights are the weights at the start of each period; at its end the
    weights become `slow + slow_step_size * (fast - slow)`.

    Args:
        steps_per_slow_update: int >= 1, updates per period (default 5).
        slow_step_size: float in (0, 1], the interpolation factor (default 0.5).
    """

    def __init__(self, *args, steps_per_slow_update=5, slow_step_size=0.5, **kwargs):
        if (
            isinstance(steps_per_slow_update, bool)
            or not isinstance(steps_per_slow_update, (int, np.integer))
            or steps_per_slow_update < 1
        ):
            raise ValueError(
                "`steps_per_slow_update` must be an integer >= 1; received "
                f"{steps_per_slow_update!r}."
            )
        if not 0 < slow_step_size <= 1:
            raise ValueError(
                f"`slow_step_size` must be in (0, 1]; received {slow_step_size!r}."
            )
        super().__init__(*args, **kwargs)
        self.steps_per_slow_update = int(steps_per_slow_update)
        self.slow_step_size = float(slow_step_size)

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self._slow_weights = self.add_optimizer_variables(variables, "slow")

    def _pairs(self):
        return [
            (w, s)
            for w, s in zip(self._trainable_variables, self._slow_weights)
            if s is not None
        ]

    def _before_update(self, variables):
        super()._before_update(variables)
        # Remembering the weights at the start of a period (rather than at
        # build time) also picks up weights loaded after the optimizer was built.
        period_starts = ops.equal(ops.mod(self.iterations, self.steps_per_slow_update), 0)

        def remember():
            for weight, slow in self._pairs():
                self._update_variable(slow, lambda _, w: w, weight)

        self._run_if(period_starts, remember)

    def _after_update(self, variables):
        super()._after_update(variables)
        alpha = self.slow_step_size
        period_ends = ops.equal(
            ops.mod(self.iterations + 1, self.steps_per_slow_update), 0
        )

        def pull_back():
            for weight, slow in self._pairs():
                self._update_variable(weight, lambda w, s: s + alpha * (w - s), slow)

        self._run_if(period_ends, pull_back)

    def get_config(self):
        config = super().get_config()
        config["steps_per_slow_update"] = self.steps_per_slow_update
        config["slow_step_size"] = self.slow_step_size
        return config


_EXTENSION_NAMES.update(
    {
        _WeightDecay: "weight decay",
        _LayerAdaptation: "layer adaptation",
        _ParameterWiseLR: "parameter-wise learning rates",
        _PiecewiseLinearLR: "a piecewise linear learning rate",
        _GradientAccumulation: "gradient accumulation",
        _ExponentialMovingAverage: "an exponential moving average",
        _Lookahead: "lookahead",
    }
)


# ---------------------------------------------------------------------------
# Public extension functions
# ---------------------------------------------------------------------------


def extend_with_weight_decay(base_optimizer, name=None):
    """Add decoupled weight decay (`weight_decay_rate`, `exclude_from_weight_decay`).

    Example:

    ```python
    AdamW = extend_with_weight_decay(keras.optimizers.Adam, name="AdamW")
    optimizer = AdamW(learning_rate=1e-4, weight_decay_rate=0.01,
                      exclude_from_weight_decay=["Norm", "bias"])
    ```
    """
    return _extend(base_optimizer, _WeightDecay, name, "WithWeightDecay")


def extend_with_layer_adaptation(base_optimizer, name=None):
    """Add LAMB's layer-wise trust ratio (`exclude_from_layer_adaptation`).

    Extending an optimizer that already has weight decay gives LAMB, with the
    decay inside the trust ratio:

    ```python
    LAMB = extend_with_layer_adaptation(AdamW, name="LAMB")
    optimizer = LAMB(learning_rate=1e-3, weight_decay_rate=0.01,
                     exclude_from_weight_decay=["Norm", "bias"],
                     exclude_from_layer_adaptation=["Norm", "bias"])
    ```
    """
    return _extend(base_optimizer, _LayerAdaptation, name, "WithLayerAdaptation")


def extend_with_parameter_wise_lr(base_optimizer, name=None):
    """Add per-variable learning-rate multipliers (`paramwise_lr_schedule`).

    ```python
    AdamPLR = extend_with_parameter_wise_lr(keras.optimizers.Adam)
    optimizer = AdamPLR(learning_rate=1e-4, paramwise_lr_schedule={"Embedding": 0.1})
    ```
    """
    return _extend(base_optimizer, _ParameterWiseLR, name, "WithParamwiseLR")


def extend_with_piecewise_linear_lr(base_optimizer, name=None):
    """Multiply the learning rate by a piecewise-linear schedule (`lr_schedule`).

    ```python
    AdamLR = extend_with_piecewise_linear_lr(keras.optimizers.Adam, name="AdamLR")
    optimizer = AdamLR(learning_rate=1e-4, lr_schedule={1000: 1, 2000: 0.1})
    ```
    """
    return _extend(base_optimizer, _PiecewiseLinearLR, name, "WithPiecewiseLR")


def extend_with_gradient_accumulation(base_optimizer, name=None):
    """Update once every `grad_accum_steps` batches with their mean gradient.

    Works in `model.fit` on TensorFlow (also under MirroredStrategy) and JAX.

    ```python
    AdamGA = extend_with_gradient_accumulation(keras.optimizers.Adam, name="AdamGA")
    optimizer = AdamGA(learning_rate=1e-4, grad_accum_steps=4)
    ```
    """
    return _extend(
        base_optimizer, _GradientAccumulation, name, "WithGradientAccumulation"
    )


def extend_with_exponential_moving_average(base_optimizer, name=None):
    """Keep an EMA of the weights (`ema_momentum`), with `apply_ema_weights()`
    and `reset_old_weights()` to swap it in and out.

    ```python
    AdamEMA = extend_with_exponential_moving_average(keras.optimizers.Adam)
    optimizer = AdamEMA(learning_rate=1e-4, ema_momentum=0.999)
    model.compile(optimizer, loss)
    model.fit(x, y)
    optimizer.apply_ema_weights()   # evaluate / save with averaged weights
    optimizer.reset_old_weights()   # back to the trained weights
    ```
    """
    return _extend(base_optimizer, _ExponentialMovingAverage, name, "WithEMA")


def extend_with_lookahead(base_optimizer, name=None):
    """Add Lookahead (`steps_per_slow_update`, `slow_step_size`).

    ```python
    AdamLA = extend_with_lookahead(keras.optimizers.Adam, name="AdamLA")
    optimizer = AdamLA(learning_rate=1e-3, steps_per_slow_update=5,
                       slow_step_size=0.5)
    ```
    """
    return _extend(base_optimizer, _Lookahead, name, "WithLookahead")


# ---------------------------------------------------------------------------
# AdaFactor
# ---------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package=_PACKAGE)
class AdaFactor(keras.optimizers.Optimizer):
    """AdaFactor with factored second moments (memory ~ rows + columns).

    For a weight whose two largest dimensions are both at least
    `min_dim_size_to_factor`, only the row and column means of the squared
    gradient are stored; smaller weights keep a full second moment. The step is
    g / sqrt(v), clipped to an RMS of `clipping_threshold`, optionally smoothed
    by momentum `beta1`, and scaled by the learning rate times
    max(epsilon2, RMS(w)) when `multiply_by_parameter_scale`.

    Example:

    ```python
    optimizer = AdaFactor(learning_rate=1e-3)
    model.compile(optimizer, loss)
    ```

    Args:
        learning_rate: float or schedule; `None` means the relative step size
            min(0.01, 1/sqrt(t)) (times 0.05 without parameter scaling).
        beta1: momentum of the clipped step; 0 (the default) stores none.
        beta2: decay of the second moment; `None` means 1 - t^-0.8.
        epsilon1: added to the squared gradient.
        epsilon2: lower bound of the parameter scale.
        multiply_by_parameter_scale: scale steps by the weight's RMS.
        clipping_threshold: maximum RMS of the step before momentum, or None.
        min_dim_size_to_factor: smallest size of the two factored dimensions.
        relative_step: multiply `learning_rate` by min(0.01, 1/sqrt(t)).
        **kwargs: other `keras.optimizers.Optimizer` arguments.
    """

    def __init__(
        self,
        learning_rate=1e-3,
        beta1=0.0,
        beta2=None,
        epsilon1=1e-30,
        epsilon2=1e-3,
        multiply_by_parameter_scale=True,
        clipping_threshold=1.0,
        min_dim_size_to_factor=128,
        relative_step=False,
        name=None,
        **kwargs,
    ):
        if learning_rate is None:
            learning_rate, relative_step = 1.0, True
        if not 0 <= beta1 < 1:
            raise ValueError(f"`beta1` must be in [0, 1); received {beta1!r}.")
        if beta2 is not None and not 0 < beta2 < 1:
            raise ValueError(f"`beta2` must be None or in (0, 1); received {beta2!r}.")
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.beta1 = float(beta1)
        self.beta2 = None if beta2 is None else float(beta2)
        self.epsilon1 = float(epsilon1)
        self.epsilon2 = float(epsilon2)
        self.multiply_by_parameter_scale = bool(multiply_by_parameter_scale)
        self.clipping_threshold = clipping_threshold
        self.min_dim_size_to_factor = int(min_dim_size_to_factor)
        self.relative_step = bool(relative_step)

    def _factored_axes(self, shape):
        """(axis of the largest dim, axis of the second largest) or None."""
        if len(shape) < 2:
            return None
        order = np.argsort(shape, kind="stable")
        largest, second = int(order[-1]), int(order[-2])
        if shape[second] < self.min_dim_size_to_factor:
            return None
        return largest, second

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self._row_stats, self._col_stats, self._second_moments = [], [], []
        self._momentums = []
        for variable in variables:
            prefix = variable.path.replace("/", "_")
            shape = tuple(variable.shape)
            axes = self._factored_axes(shape)
            row = col = full = None
            if axes is not None:
                largest, second = axes
                # Means over the largest axis ("row" statistics) and over
                # the second largest ("column" statistics), kept as size-1 axes.
                row_shape = [1 if i == largest else d for i, d in enumerate(shape)]
                col_shape = [1 if i == second else d for i, d in enumerate(shape)]
                row = self.add_variable(
                    tuple(row_shape), dtype=variable.dtype, name=f"{prefix}_vr"
                )
                col = self.add_variable(
                    tuple(col_shape), dtype=variable.dtype, name=f"{prefix}_vc"
                )
            else:
                full = self.add_variable_from_reference(variable, "v")
            self._row_stats.append(row)
            self._col_stats.append(col)
            self._second_moments.append(full)
            self._momentums.append(
                self.add_variable_from_reference(variable, "m") if self.beta1 else None
            )

    @staticmethod
    def _rms(x):
        return ops.sqrt(ops.mean(ops.square(x)))

    def update_step(self, gradient, variable, learning_rate):
        dtype = variable.dtype
        index = self._get_variable_index(variable)
        gradient = ops.cast(_dense(gradient), dtype)
        step = ops.cast(self.iterations + 1, dtype)
        lr = ops.cast(learning_rate, dtype)
        if self.relative_step:
            relative = ops.minimum(0.01, 1.0 / ops.sqrt(step))
            if not self.multiply_by_parameter_scale:
                relative = relative * 0.05
            lr = lr * relative
        if self.multiply_by_parameter_scale:
            lr = lr * ops.maximum(self.epsilon2, self._rms(variable))
        if self.beta2 is None:
            beta2 = 1.0 - ops.power(step, -0.8)
        else:
            beta2 = ops.cast(self.beta2, dtype)
        squared = ops.square(gradient) + self.epsilon1
        axes = self._factored_axes(tuple(variable.shape))
        if axes is not None:
            largest, second = axes
            row, col = self._row_stats[index], self._col_stats[index]
            row_mean = ops.mean(squared, axis=largest, keepdims=True)
            col_mean = ops.mean(squared, axis=second, keepdims=True)
            new_row = beta2 * row + (1 - beta2) * row_mean
            new_col = beta2 * col + (1 - beta2) * col_mean
            self.assign(row, new_row)
            self.assign(col, new_col)
            # Rank-1 reconstruction: row * col / (mean of everything).
            overall = ops.mean(new_row, axis=second, keepdims=True)
            second_moment = new_row * new_col / overall
        else:
            full = self._second_moments[index]
            second_moment = beta2 * full + (1 - beta2) * squared
            self.assign(full, second_moment)
        update = gradient / ops.sqrt(second_moment)
        if self.clipping_threshold:
            excess = self._rms(update) / self.clipping_threshold
            update = update / ops.maximum(1.0, excess)
        if self.beta1:
            momentum = self._momentums[index]
            update = self.beta1 * momentum + (1 - self.beta1) * update
            self.assign(momentum, update)
        self.assign_sub(variable, lr * update)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "beta1": self.beta1,
                "beta2": self.beta2,
                "epsilon1": self.epsilon1,
                "epsilon2": self.epsilon2,
                "multiply_by_parameter_scale": self.multiply_by_parameter_scale,
                "clipping_threshold": self.clipping_threshold,
                "min_dim_size_to_factor": self.min_dim_size_to_factor,
                "relative_step": self.relative_step,
            }
        )
        return config


# Keras' Lion works as is (sign of interpolated momentum); re-exported so that
# `from bert4keras.optimizers import Lion` works and it can be extended.
Lion = keras.optimizers.Lion


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Adam(_OptimizerExtension, keras.optimizers.Adam):
    """`keras.optimizers.Adam` that is also right for TF embedding gradients.

    On TensorFlow, Keras' Adam given a sparse gradient with a repeated row (a
    token that occurs twice in the batch) adds up the squared rows instead of
    squaring their sum. This class sums repeated rows first, so its steps equal
    those of a dense gradient. Same arguments as `keras.optimizers.Adam`;
    every class made by `extend_with_*` does the same.

    On TensorFlow the step runs as TensorFlow's fused Adam kernel
    (`ResourceApplyAdam`: one pass over the weight and its two moments, the
    same formula as Keras' Adam) instead of Keras' dozen separate element-wise
    ops, each a pass over memory (30% of a BERT-base training step's op time
    at batch 1; one AdamW update 3.1x faster, benchmarks/bench_optimizer.py).
    `amsgrad=True` and the other backends run Keras' own step.

    ```python
    model.compile(optimizer=Adam(learning_rate=2e-5), loss=...)
    ```
    """

    def update_step(self, gradient, variable, learning_rate):
        if not _is_tensorflow() or self.amsgrad:
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        index = self._get_variable_index(variable)
        beta_1 = tf.cast(self.beta_1, dtype)
        beta_2 = tf.cast(self.beta_2, dtype)
        step = tf.cast(self.iterations + 1, dtype)
        # A sparse (embedding) gradient becomes dense here with its repeated
        # rows summed, as the dense update needs.
        gradient = tf.cast(_dense(gradient), dtype)
        tf.raw_ops.ResourceApplyAdam(
            var=_unwrap(variable).handle,
            m=_unwrap(self._momentums[index]).handle,
            v=_unwrap(self._velocities[index]).handle,
            beta1_power=beta_1**step,
            beta2_power=beta_2**step,
            lr=tf.cast(learning_rate, dtype),
            beta1=beta_1,
            beta2=beta_2,
            epsilon=tf.cast(self.epsilon, dtype),
            grad=gradient,
        )


# For _WeightDecay._inner_step_ignores_weights: extensions whose update_step
# only rescales the inner step, and update rules that never read the weights.
_STEPS_BLIND_TO_WEIGHTS = (_OptimizerExtension, _ParameterWiseLR)
_RULES_BLIND_TO_WEIGHTS = (
    Adam, keras.optimizers.Adam, keras.optimizers.SGD, keras.optimizers.Lion,
)

# The combinations bert4keras users know by name.
AdamW = extend_with_weight_decay(Adam, name="AdamW")
AdamLR = extend_with_piecewise_linear_lr(Adam, name="AdamLR")
AdamGA = extend_with_gradient_accumulation(Adam, name="AdamGA")
AdamLA = extend_with_lookahead(Adam, name="AdamLA")
AdamEMA = extend_with_exponential_moving_average(Adam, name="AdamEMA")
LAMB = extend_with_layer_adaptation(AdamW, name="LAMB")

__all__ = [
    "AdaFactor",
    "Adam",
    "AdamEMA",
    "AdamGA",
    "AdamLA",
    "AdamLR",
    "AdamW",
    "LAMB",
    "Lion",
    "PiecewiseLinearSchedule",
    "extend_with_exponential_moving_average",
    "extend_with_gradient_accumulation",
    "extend_with_layer_adaptation",
    "extend_with_lookahead",
    "extend_with_parameter_wise_lr",
    "extend_with_piecewise_linear_lr",
    "extend_with_weight_decay",
]
