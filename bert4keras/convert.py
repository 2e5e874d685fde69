"""Convert a HuggingFace checkpoint folder to the Google TF checkpoint layout.

    python -m bert4keras.convert HF_FOLDER OUT_FOLDER [--model bert]

writes OUT_FOLDER/bert_config.json, OUT_FOLDER/bert_model.ckpt.* and copies
vocab.txt / spiece.model when present, so the result loads with
`build_transformer_model(OUT/bert_config.json, OUT/bert_model.ckpt)` and
with any tool that reads Google's released checkpoints.
"""
import argparse
import json
import os
import shutil

from bert4keras import checkpoints
from bert4keras.models import HF_MODEL_TYPES, load_config


def hf_model_name(hf_folder):
    """The model= name for an HF folder, from its config.json model_type."""
    with open(os.path.join(hf_folder, "config.json")) as f:
        model_type = json.load(f).get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(
            f"{hf_folder}: model_type {model_type!r} is not supported; "
            f"supported: {', '.join(sorted(HF_MODEL_TYPES))}."
        )
    return HF_MODEL_TYPES[model_type][0]


def convert_hf_to_google(hf_folder, out_folder, model=None):
    """Writes the Google-format checkpoint of an HF folder; returns the ckpt prefix."""
    from bert4keras.models import MODELS, _config_to_arguments, _resolve, accepted_arguments

    hf_folder, out_folder = os.fspath(hf_folder), os.fspath(out_folder)
    if not os.path.isdir(hf_folder):
        raise FileNotFoundError(f"HF model folder not found: {hf_folder!r}.")
    if not checkpoints.find_safetensors(hf_folder):
        raise FileNotFoundError(f"No model.safetensors in {hf_folder!r}.")
    model = model or hf_model_name(hf_folder)
    config = load_config(hf_folder)
    cls, fixed = _resolve(MODELS[model][0]), MODELS[model][1]
    arguments = {**_config_to_arguments(config), **fixed}
    transformer = cls(**{k: v for k, v in arguments.items() if k in accepted_arguments(cls)})
    state = {}
    for file in checkpoints.find_safetensors(hf_folder):
        state.update(checkpoints.read_safetensors(file))
    tensors = transformer.from_hf_weights(state)
    os.makedirs(out_folder, exist_ok=True)
    prefix = os.path.join(out_folder, "bert_model.ckpt")
    checkpoints.save_tf_checkpoint(prefix, tensors)
    google = {k: v for k, v in config.items() if k != "model_type"}
    google["bert4keras_model"] = model  # lets build_transformer_model pick the family
    with open(os.path.join(out_folder, "bert_config.json"), "w") as f:
        json.dump(google, f, indent=2)
    for extra in ("vocab.txt", "spiece.model", "sentencepiece.bpe.model"):
        if os.path.exists(os.path.join(hf_folder, extra)):
            shutil.copy(os.path.join(hf_folder, extra), os.path.join(out_folder, extra))
    return prefix


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("hf_folder", help="folder with config.json and model.safetensors")
    parser.add_argument("out_folder", help="where bert_config.json and bert_model.ckpt go")
    parser.add_argument("--model", default=None, help="model= name (default: from config.json)")
    args = parser.parse_args(argv)
    prefix = convert_hf_to_google(args.hf_folder, args.out_folder, args.model)
    print(f"wrote {prefix}")


if __name__ == "__main__":
    main()
