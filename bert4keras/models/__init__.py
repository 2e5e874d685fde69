"""Model families and `build_transformer_model`, the one entry point."""
import importlib
import inspect
import json
import os

import keras

from bert4keras.models.base import Transformer, accepted_arguments  # noqa: F401

# Families are imported on first use; each entry is "module:attribute".
#: model= name -> (class, fixed keyword arguments).
MODELS = {
    "bert": ("bert4keras.models.bert:BERT", {}),
    "roberta": ("bert4keras.models.bert:BERT", {}),
    "albert": ("bert4keras.models.albert:ALBERT", {}),
    "albert_unshared": ("bert4keras.models.albert:ALBERTUnshared", {}),
    "nezha": ("bert4keras.models.nezha:NEZHA", {}),
    "roformer": ("bert4keras.models.roformer:RoFormer", {}),
    "roformer_v2": ("bert4keras.models.roformer:RoFormerV2", {}),
    "electra": ("bert4keras.models.electra:ELECTRA", {}),
    "gpt": ("bert4keras.models.gpt:GPT", {}),
    "gpt2": ("bert4keras.models.gpt:GPT2", {}),
    "gpt2_ml": ("bert4keras.models.gpt:GPT2_ML", {}),
    "t5": ("bert4keras.models.t5:T5", {}),
    "t5.1.0": ("bert4keras.models.t5:T5", {"version": "t5.1.0"}),
    "t5.1.1": ("bert4keras.models.t5:T5", {"version": "t5.1.1"}),
    "mt5.1.1": ("bert4keras.models.t5:T5", {"version": "mt5.1.1"}),
}

#: HF config "model_type" -> (model= name, converter of config.json keys).
HF_MODEL_TYPES = {
    "bert": ("bert", "bert4keras.models.bert:bert_hf_config"),
    "roberta": ("roberta", "bert4keras.models.bert:bert_hf_config"),
    "albert": ("albert", "bert4keras.models.albert:albert_hf_config"),
    "roformer": ("roformer", "bert4keras.models.roformer:roformer_hf_config"),
    "electra": ("electra", "bert4keras.models.electra:electra_hf_config"),
    "gpt2": ("gpt2", "bert4keras.models.gpt:gpt2_hf_config"),
    "t5": ("t5", "bert4keras.models.t5:t5_hf_config"),
    "mt5": ("mt5.1.1", "bert4keras.models.t5:t5_hf_config"),
}


def _resolve(target):
    if not isinstance(target, str):
        return target
    module, attribute = target.split(":")
    return getattr(importlib.import_module(module), attribute)


def load_config(config_path):
    """Reads bert_config.json (Google keys) or an HF config.json, as Google keys."""
    if os.path.isdir(config_path):
        for name in ("bert_config.json", "config.json"):
            if os.path.exists(os.path.join(config_path, name)):
                config_path = os.path.join(config_path, name)
                break
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"Config file not found: {config_path!r}.")
    with open(config_path) as f:
        config = json.load(f)
    model_type = config.get("model_type")
    if model_type is not None:
        if model_type not in HF_MODEL_TYPES:
            raise ValueError(
                f"{config_path}: HF model_type {model_type!r} is not supported; "
                f"supported: {', '.join(sorted(HF_MODEL_TYPES))}."
            )
        config = _resolve(HF_MODEL_TYPES[model_type][1])(config)
        config["model_type"] = model_type
    return config


def _config_to_arguments(config):
    """Google config keys -> Transformer constructor arguments (bert4keras rules)."""
    args = dict(config)
    renames = {
        "max_position_embeddings": "max_position",
        "hidden_dropout_prob": "dropout_rate",
        "attention_probs_dropout_prob": "attention_dropout_rate",
        "type_vocab_size": "segment_vocab_size",
    }
    for old, new in renames.items():
        if old in args:
            args[new] = args.pop(old)
    return args


def build_transformer_model(
    config_path=None,
    checkpoint_path=None,
    model=None,
    application=None,
    return_keras_model=True,
    dtype=None,
    **kwargs,
):
    """Builds a transformer and optionally loads a checkpoint into it.

    config_path: Google `bert_config.json` or an HF `config.json` (or a folder
    holding one). checkpoint_path: a Google TF checkpoint prefix
    (`.../bert_model.ckpt`), or an HF folder / `model.safetensors`.
    model: one of `MODELS`; by default the config's family (an HF config's
    model_type, or the `bert4keras_model` key that `bert4keras.convert`
    writes), else 'bert'. application: 'encoder', 'lm' or 'unilm' (default: the family's
    own, 'encoder' for BERT-like models). dtype: a Keras dtype policy for
    this model's layers, e.g. 'bfloat16' (weights stored and computed in
    bf16: inference at half the memory and without casting every weight on
    every call) or 'mixed_bfloat16' (float32 weights, bf16 compute: for
    training); default: the global policy, which stays as it was. Keyword
    arguments override config values (e.g. with_pool=True, keep_tokens=...).

    >>> model = build_transformer_model(                 # doctest: +SKIP
    ...     "uncased_L-12_H-768_A-12/bert_config.json",
    ...     "uncased_L-12_H-768_A-12/bert_model.ckpt")
    """
    config = {}
    if config_path is not None:
        config = load_config(os.fspath(config_path))
    if model is None:
        model = config.get("bert4keras_model") or HF_MODEL_TYPES.get(config.get("model_type"), ("bert",))[0]
    if isinstance(model, str):
        key = model.lower()
        if key not in MODELS:
            raise ValueError(f"Unknown model {model!r}; valid: {', '.join(MODELS)}.")
        cls, fixed = _resolve(MODELS[key][0]), MODELS[key][1]
    elif inspect.isclass(model) and issubclass(model, Transformer):
        cls, fixed = model, {}
    else:
        raise TypeError(f"model must be a name or a Transformer subclass, got {model!r}.")
    valid = accepted_arguments(cls)
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        raise TypeError(
            f"Unknown argument(s) {', '.join(unknown)} for {cls.__name__}; "
            f"valid: {', '.join(sorted(valid))}."
        )
    config = _config_to_arguments(config)
    config.update(fixed)
    config.update(kwargs)
    if application is not None:  # None: the family's own default ('encoder', GPT's 'lm', ...)
        config["application"] = application
    previous_policy = keras.config.dtype_policy()
    if dtype is not None:  # layers take the global policy when they are made
        keras.config.set_dtype_policy(dtype)
    try:
        transformer = cls(**{k: v for k, v in config.items() if k in valid})
        transformer.build()
    finally:
        keras.config.set_dtype_policy(previous_policy)
    if checkpoint_path is not None:
        transformer.load_weights_from_checkpoint(checkpoint_path)
    return transformer.model if return_keras_model else transformer


def save_weights_as_checkpoint(model, prefix, write_config=True):
    """Saves a model built by this library in the Google TF checkpoint format."""
    transformer = model if isinstance(model, Transformer) else getattr(model, "bert4keras", None)
    if transformer is None:
        raise ValueError(
            "This keras.Model carries no bert4keras mapping (was it reloaded from a file?). "
            "Build it with build_transformer_model(..., return_keras_model=False) and call "
            "save_weights_as_checkpoint on that object."
        )
    return transformer.save_weights_as_checkpoint(prefix, write_config=write_config)
