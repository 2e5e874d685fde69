"""The `bert4keras` command.

    bert4keras serve --model m.keras --vocab vocab.txt [--task classify] ...
    bert4keras export --model m.keras [--saved-model DIR] [--onnx FILE]
    bert4keras convert HF_FOLDER OUT_FOLDER [--model bert]

Each subcommand takes the arguments of its module (`bert4keras.serving`,
`bert4keras.export`, `bert4keras.convert`); `bert4keras SUBCOMMAND --help`
lists them.
"""
import argparse
import importlib

#: subcommand -> (module with a main(argv), one-line description)
COMMANDS = {
    "serve": ("bert4keras.serving", "serve a saved model over HTTP with a JSON API"),
    "export": ("bert4keras.export", "export a saved model to a TF SavedModel and/or ONNX"),
    "convert": ("bert4keras.convert", "convert an HF checkpoint folder to the Google TF layout"),
}


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="bert4keras",
        description="bert4keras command line.",
        epilog="\n".join(f"  {name:8s} {about}" for name, (_, about) in COMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=sorted(COMMANDS), help="what to do")
    parser.add_argument("arguments", nargs=argparse.REMAINDER, help="the subcommand's arguments")
    args = parser.parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    if args.command == "convert":  # convert.main has no prog argument
        return module.main(args.arguments)
    return module.main(args.arguments, prog=f"bert4keras {args.command}")


if __name__ == "__main__":
    main()
