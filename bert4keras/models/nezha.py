"""NEZHA: BERT with clipped relative positions instead of a position table.

The relative positions are NEZHA's "functional" ones: a fixed sinusoid of the
distance j - i clipped to [-max_relative_position, max_relative_position]
(64 by default), added to the keys in the scores and to the values in the
outputs (`RelativePositionAttention`). Nothing about positions is trained, so
a NEZHA checkpoint has BERT's Google names without
bert/embeddings/position_embeddings.
"""
from bert4keras.layers import RelativePositionAttention
from bert4keras.models.bert import BERT


class NEZHA(BERT):
    """NEZHA (Huawei). Checkpoints: Google BERT naming, no position table.

    >>> model = NEZHA(vocab_size=100, hidden_size=16, num_hidden_layers=1,
    ...               num_attention_heads=2, intermediate_size=32).build()
    >>> "Embedding-Position" in [layer.name for layer in model.layers]
    False
    """

    absolute_positions = False

    def __init__(self, max_relative_position=64, **kwargs):
        super().__init__(**kwargs)
        reject_absolute_position_options(self)
        self.max_relative_position = max_relative_position

    def attention_layer(self):
        return RelativePositionAttention, {"max_relative_position": self.max_relative_position}

    def google_config(self):
        return {
            **super().google_config(),
            "max_relative_position": self.max_relative_position,
            "use_relative_position": True,
        }


def reject_absolute_position_options(transformer):
    """Families without a position table cannot honour these BERT options."""
    name = type(transformer).__name__
    if transformer.hierarchical_position:
        raise ValueError(
            f"{name} has no absolute position table, so hierarchical_position does not apply; "
            "drop the argument (its positions extend to any length already)."
        )
    if transformer.custom_position_ids:
        raise ValueError(f"{name} does not take custom_position_ids; drop the argument.")
