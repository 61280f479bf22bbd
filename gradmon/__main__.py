"""Command line: `gradmon demo [--log-dir DIR]`, `gradmon summary LOGDIR [--json] [--png FILE]`.

`gradmon summary` never imports TensorFlow (it starts in a fraction of a
second); `gradmon demo` imports it when it runs.
"""

import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="gradmon", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train a small monitored network and write TensorBoard logs")
    demo.add_argument("--log-dir", default="runs/demo", help="run directory (default: runs/demo)")
    demo.add_argument("--epochs", type=int, default=8, help="training epochs (default: 8)")
    summary = commands.add_parser(
        "summary", help="health report of a gradmon run: per-layer table, curvature, flags")
    from gradmon.summary import cli  # TensorFlow-free

    cli.add_arguments(summary)
    args = parser.parse_args(argv)
    if args.command == "summary":
        return cli.run_command(args)
    if args.epochs < 1:
        parser.error(f"Invalid value for argument `epochs`. Expected a positive integer. "
                     f"Received: epochs={args.epochs}")
    from gradmon import demo as demo_module  # imports TensorFlow and Keras

    demo_module.run(log_dir=args.log_dir, epochs=args.epochs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
