"""The `jaxlm` command: argument parsing and user-facing messages only."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jaxlm.errors import JaxlmError, NonFiniteLoss
from jaxlm.train.preemption import PREEMPTED_EXIT_CODE, Preempted


def _split_overrides(items: list[str]) -> tuple[str | None, list[str]]:
    """First non-override positional is the config file; the rest are key=value."""
    config, overrides = None, []
    for item in items:
        if "=" not in item and config is None:
            config = item
        else:
            overrides.append(item)
    return config, overrides


def cmd_train(args: argparse.Namespace) -> int:
    import jax

    from jaxlm import distributed
    from jaxlm.config import load_config
    from jaxlm.train.loop import default_run_dir, train

    config_path, overrides = _split_overrides(args.config)
    config = load_config(config_path, overrides)
    distributed.initialize(config.distributed)  # before anything asks JAX for devices
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(config)
    result = train(config, run_dir, progress=not args.no_progress)
    if jax.process_index() != 0:
        return 0  # multi-host: process 0 speaks for the run
    last = result.history[-1] if result.history else {}
    if "eval_loss" in last:
        print(
            f"step {last['step']}: train loss {last['loss']:.4f}, eval loss {last['eval_loss']:.4f}"
        )
    print(f"run directory: {run_dir}")
    if result.sample:
        print("--- sample ---")
        print(result.sample)
    return 0


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from jaxlm.config import load_config
    from jaxlm.data.pipeline import split_documents
    from jaxlm.data.sources import read_documents
    from jaxlm.data.tokenizer import load_tokenizer, train_tokenizer

    config_path, overrides = _split_overrides(args.config)
    config = load_config(config_path, overrides)
    docs = read_documents(config.data.path, config.data.text_field, config.data.split)
    train_docs, _ = split_documents(docs, config.data.eval_fraction)
    tok = config.tokenizer
    out = train_tokenizer(train_docs, args.out, tok.vocab_size, tok.model_type)
    print(f"wrote {out} ({load_tokenizer(out).get_piece_size()} pieces)")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from jaxlm.config import load_config
    from jaxlm.info import format_info, model_info

    config_path, overrides = _split_overrides(args.config)
    config = load_config(config_path, overrides)
    print(format_info(config.name, model_info(config)))
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from jaxlm.aot import compile_train_step, format_report, parse_topology
    from jaxlm.config import load_config

    config_path, overrides = _split_overrides(args.config)
    topology = parse_topology(args.topology)
    if args.slices < 1:
        raise JaxlmError(f"--slices {args.slices}: must be at least 1")
    config = load_config(config_path, overrides)
    report = compile_train_step(config, topology, args.slices)
    print(format_report(report))
    return 0 if report.fits else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxlm", description="Train language models with JAX.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train (or resume) a model from a YAML config")
    train.add_argument("config", nargs="+", help="CONFIG.yaml followed by key=value overrides")
    train.add_argument("--run-dir", help="run directory (default: runs/<config name>)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=cmd_train)

    info = sub.add_parser("info", help="parameter count and FLOPs per token of a config")
    info.add_argument("config", nargs="+", help="CONFIG.yaml followed by key=value overrides")
    info.set_defaults(func=cmd_info)

    tok = sub.add_parser("tokenizer", help="tokenizer tools")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", required=True)
    tok_train = tok_sub.add_parser("train", help="train a sentencepiece model on a config's data")
    tok_train.add_argument("config", nargs="+", help="CONFIG.yaml followed by key=value overrides")
    tok_train.add_argument("--out", default="tokenizer.model", help="output .model file")
    tok_train.set_defaults(func=cmd_tokenizer_train)

    aot = sub.add_parser(
        "compile", help="compile the train step for a Cloud TPU topology here (needs [tpu])"
    )
    aot.add_argument("config", nargs="+", help="CONFIG.yaml followed by key=value overrides")
    aot.add_argument("--topology", required=True, help="e.g. v5p-128, v5e-16, v5e-2x2")
    aot.add_argument("--slices", type=int, default=1, help="multislice: number of slices")
    aot.set_defaults(func=cmd_compile)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if e.startswith("-") or "=" not in e]
    if unknown or not hasattr(args, "config"):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    args.config = args.config + extra  # overrides placed after an option
    try:
        return args.func(args)
    except Preempted as err:
        print(f"jaxlm: {err}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except NonFiniteLoss as err:
        print(f"jaxlm: error: {err}", file=sys.stderr)
        return 3
    except JaxlmError as err:
        print(f"jaxlm: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("jaxlm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
