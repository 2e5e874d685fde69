"""ELECTRA: the BERT encoder under the `electra/` scope, with its own heads.

with_discriminator=True adds the replaced-token-detection head:
Dense(hidden, hidden_act) -> Dense(1) -> sigmoid (another activation name, or
'linear' for logits, may be given instead of True); Google names
discriminator_predictions/dense and discriminator_predictions/dense_1.
with_mlm adds the generator's MLM head (generator_predictions/dense,
generator_predictions/LayerNorm, output bias generator_predictions/output_bias,
output projection tied to the embeddings). When embedding_size != hidden_size
the embeddings go through electra/embeddings_project. HF
`ElectraModel` / `ElectraForPreTraining` / `ElectraForMaskedLM` safetensors
are renamed to these names.
"""
import re

import keras

from bert4keras.models.base import linear_kernel
from bert4keras.models.bert import BERT, _activation, _dense, bert_hf_config, bert_hf_to_google


class ELECTRA(BERT):
    """ELECTRA discriminator (or generator, with with_mlm).

    Outputs: hidden states; with one head its output alone; with both
    [discriminator, mlm].

    >>> model = ELECTRA(vocab_size=100, embedding_size=8, hidden_size=16,
    ...                 num_hidden_layers=1, num_attention_heads=2,
    ...                 intermediate_size=32, with_discriminator=True).build()
    >>> model.output.shape
    (None, None, 1)
    """

    prefix = "electra"

    def __init__(self, with_discriminator=False, **kwargs):
        for option in ("with_pool", "with_nsp"):
            if kwargs.get(option):
                raise ValueError(
                    f"ELECTRA has no pooler / NSP head; drop {option}= (use with_discriminator=True "
                    "for the replaced-token-detection head)."
                )
        super().__init__(**kwargs)
        self.with_discriminator = with_discriminator

    def apply_final_layers(self, x):
        outputs = []
        if self.with_discriminator:
            activation = "sigmoid" if self.with_discriminator is True else self.with_discriminator
            y = self.apply(
                x,
                keras.layers.Dense,
                units=self.hidden_size,
                activation=_activation(self.hidden_act),
                kernel_initializer=self.initializer(),
                name="Discriminator-Dense",
            )
            y = self.apply(
                y,
                keras.layers.Dense,
                units=1,
                activation=activation,
                dtype="float32",
                kernel_initializer=self.initializer(),
                name="Discriminator-Prediction",
            )
            outputs.append(y)
        if self.with_mlm:
            outputs.append(super().apply_final_layers(x))  # BERT's MLM head, same layout
        if not outputs:
            return x
        return outputs[0] if len(outputs) == 1 else outputs

    def vocab_variables(self):
        return (f"{self.prefix}/embeddings/word_embeddings", "generator_predictions/output_bias")

    def variable_mapping(self):
        mapping = super().variable_mapping()
        p = self.prefix
        renames = {
            f"{p}/encoder/embedding_hidden_mapping_in": f"{p}/embeddings_project",
            "cls/predictions/transform": "generator_predictions",
            "cls/predictions": "generator_predictions",
        }
        for path, name in mapping.items():
            for old, new in renames.items():
                if name.startswith(old + "/"):
                    mapping[path] = new + name[len(old):]
                    break
        if self.with_discriminator:
            mapping.update(_dense("Discriminator-Dense", "discriminator_predictions/dense"))
            mapping.update(_dense("Discriminator-Prediction", "discriminator_predictions/dense_1"))
        return mapping

    def from_hf_weights(self, state):
        return electra_hf_to_google(state)

    def google_config(self):
        config = super().google_config()
        config["embedding_size"] = self.embedding_size
        return config


def electra_hf_to_google(state):
    """HF ELECTRA weights (discriminator or generator) in Google ELECTRA naming."""
    encoder = {}
    out = {}
    for name, value in state.items():
        if name.startswith("electra."):
            if name.startswith("electra.embeddings_project."):
                leaf = name.rsplit(".", 1)[1]
                scope = "electra/embeddings_project"
                out[f"{scope}/{'kernel' if leaf == 'weight' else 'bias'}"] = (
                    linear_kernel(value) if leaf == "weight" else value
                )
            else:
                encoder["bert." + name[len("electra."):]] = value
            continue
        match = re.fullmatch(r"(discriminator_predictions|generator_predictions)\.(\w+)\.(weight|bias)", name)
        if match:
            head, module, leaf = match.groups()
            module = {"dense_prediction": "dense_1"}.get(module, module)
            if module == "LayerNorm":
                out[f"{head}/LayerNorm/{'gamma' if leaf == 'weight' else 'beta'}"] = value
            else:
                out[f"{head}/{module}/{'kernel' if leaf == 'weight' else 'bias'}"] = (
                    linear_kernel(value) if leaf == "weight" else value
                )
        elif name == "generator_lm_head.bias":
            out["generator_predictions/output_bias"] = value
    word_embeddings = encoder.get("bert.embeddings.word_embeddings.weight")
    head = state.get("generator_lm_head.weight")
    if head is not None and word_embeddings is not None and not (head == word_embeddings).all():
        raise ValueError(
            "This ELECTRA generator's output projection (generator_lm_head.weight) is not tied to "
            "the word embeddings; only tied generators are supported."
        )
    out.update(bert_hf_to_google(encoder, "electra", position_offset=0))
    return out


def electra_hf_config(config):
    """HF ELECTRA config.json -> Google bert_config.json keys."""
    google = bert_hf_config(config)
    google["embedding_size"] = config.get("embedding_size", google["hidden_size"])
    return google
