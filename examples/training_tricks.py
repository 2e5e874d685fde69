"""Training tricks, each switched by a flag, on the review sentiment task.

* `--grad-accum-steps N`: gradient accumulation (`extend_with_gradient_accumulation`):
  N batches of size B make one update, as one batch of N*B would;
* `--ema M`: an exponential moving average of the weights
  (`extend_with_exponential_moving_average`), swapped in for the evaluation
  with `apply_ema_weights()`;
* `--adversarial EPS`: FGM adversarial training on the token embeddings
  (`bert4keras.adversarial.adversarial_training`);
* `--recompute`: recompute each transformer block's activations in the backward pass
  instead of keeping them (`build_transformer_model(..., recompute=True)`):
  less memory for more time.

The task, data split and model are those of `sentiment.py`, on fewer reviews
so that each setting runs in a few minutes. The script prints the test
accuracy, the training time and the peak memory of the process.

    python examples/training_tricks.py                               # plain fine-tuning
    python examples/training_tricks.py --grad-accum-steps 4 --batch-size 8
    python examples/training_tricks.py --ema 0.99 --adversarial 0.5 --recompute
    python examples/training_tricks.py --smoke --grad-accum-steps 2 --ema 0.9 --adversarial 0.5 --recompute

Measured settings are listed in examples/README.md.
"""
import argparse
import os
import resource
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # keep TensorFlow's start-up chatter out

import keras  # noqa: E402

import chinese_model  # noqa: E402
import datasets  # noqa: E402
from bert4keras import build_transformer_model  # noqa: E402
from bert4keras.adversarial import adversarial_training  # noqa: E402
from bert4keras.heads import GlobalAveragePooling1D  # noqa: E402
from bert4keras.optimizers import (  # noqa: E402
    Adam,
    extend_with_exponential_moving_average,
    extend_with_gradient_accumulation,
    extend_with_parameter_wise_lr,
)
from bert4keras.snippets import fit_generator  # noqa: E402
from sentiment import ReviewGenerator, accuracy  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    chinese_model.add_model_arguments(parser)
    parser.add_argument("--grad-accum-steps", type=int, default=1, help="batches per update (1: no accumulation)")
    parser.add_argument("--ema", type=float, default=None, help="EMA momentum, e.g. 0.99 (default: no EMA)")
    parser.add_argument("--adversarial", type=float, default=None, help="FGM epsilon, e.g. 0.5 (default: off)")
    parser.add_argument("--recompute", nargs="?", const="full", choices=("full", "attention"),
                        help="recompute activations in the backward pass: full (the default when the flag is "
                             "given) or attention (the attention core only)")
    parser.add_argument("--train-size", type=int, default=4000)
    parser.add_argument("--maxlen", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--embedding-lr", type=float, default=20.0, help="learning-rate multiplier of the token embeddings")
    parser.add_argument("--layers", type=int, default=None, help="use only the first N transformer layers")
    parser.add_argument("--buckets", type=int, default=8, help="length buckets (batches are padded to their bucket's bound)")
    parser.add_argument("--smoke", action="store_true", help="tiny run: 128 reviews, 2 layers, maxlen 32")
    args = parser.parse_args()
    if args.smoke:
        args.train_size, args.layers, args.maxlen = 128, 2, 32
        args.buckets = 2
    return args


def main():
    args = parse_args()
    train, test = datasets.split_reviews()
    train, test = train[: args.train_size], test[:128] if args.smoke else test
    config, checkpoint, tokenizer = chinese_model.resolve(args)

    def encode(data):
        return [(tokenizer.encode(text, maxlen=args.maxlen)[0], label) for text, label in data]

    train_generator, test_generator = [
        ReviewGenerator(encode(data), args.batch_size, bucket_boundaries=args.buckets, length_fn=lambda item: len(item[0]))
        for data in (train, test)
    ]

    extra = {} if args.layers is None else {"num_hidden_layers": args.layers}
    recompute = {"full": True, "attention": "attention"}.get(args.recompute)  # None: RECOMPUTE variable
    bert = build_transformer_model(config, checkpoint, recompute=recompute, **extra)
    x = GlobalAveragePooling1D()([bert.output, bert.inputs[0]])
    x = keras.layers.Dropout(0.1)(x)
    model = keras.Model(bert.inputs, keras.layers.Dense(2, activation="softmax")(x))

    Optimizer, options = extend_with_parameter_wise_lr(Adam), {}
    if args.grad_accum_steps > 1:
        Optimizer = extend_with_gradient_accumulation(Optimizer)
        options["grad_accum_steps"] = args.grad_accum_steps
    if args.ema is not None:
        Optimizer = extend_with_exponential_moving_average(Optimizer)
        options["ema_momentum"] = args.ema
    optimizer = Optimizer(
        learning_rate=args.lr, paramwise_lr_schedule={"Embedding-Token": args.embedding_lr}, **options
    )
    model.compile(optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    if args.adversarial is not None:
        adversarial_training(model, "Embedding-Token", epsilon=args.adversarial)

    settings = {k: v for k, v in vars(args).items() if k in ("grad_accum_steps", "ema", "adversarial", "recompute")}
    print(f"{len(train)} training / {len(test)} test reviews; {settings}")
    start = time.time()
    fit_generator(model, train_generator, epochs=args.epochs)
    seconds = time.time() - start
    if args.ema is not None:
        optimizer.apply_ema_weights()  # evaluate the averaged weights
    test_accuracy = accuracy(model, test_generator)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"training time: {seconds:.0f} s, peak memory: {peak:.0f} MiB")
    print(f"test accuracy: {test_accuracy:.2%}")


if __name__ == "__main__":
    main()
