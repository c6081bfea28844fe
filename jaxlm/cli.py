"""The `jaxlm` command: argument parsing and user-facing messages only."""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

from jaxlm.cli_use import cmd_attention, cmd_eval, cmd_generate, cmd_plot, cmd_score
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
    if args.profile and not config.train.profile_steps:
        from jaxlm.observe.profile import default_window

        config = config.replace(train={"profile_steps": default_window(config.train.steps)})
    distributed.initialize(config.distributed)  # before anything asks JAX for devices
    run_dir = args.run_dir or default_run_dir(config)  # a local path or gs://
    result = train(config, run_dir, progress=not args.no_progress)
    if jax.process_index() != 0:
        return 0  # multi-host: process 0 speaks for the run
    last = result.history[-1] if result.history else {}
    if "eval_loss" in last:
        print(
            f"step {last['step']}: train loss {last['loss']:.4f}, eval loss {last['eval_loss']:.4f}"
        )
    if "eval_mlm_accuracy" in last:  # bert
        print(
            f"eval masked-token accuracy {last['eval_mlm_accuracy']:.4f}, "
            f"NSP accuracy {last['eval_nsp_accuracy']:.4f}"
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
    from jaxlm.data.tasks import sample_examples
    from jaxlm.data.tokenizer import load_tokenizer, train_tokenizer

    config_path, overrides = _split_overrides(args.config)
    config = load_config(config_path, overrides)
    docs = read_documents(config.data.path, config.data.text_field, config.data.split)
    if not config.data.eval_path:  # else all of data.path trains
        docs, _ = split_documents(docs, config.data.eval_fraction)
    tok = config.tokenizer
    sample = sample_examples(config, docs)  # bounded, whatever the corpus size
    out = train_tokenizer(sample, args.out, tok.vocab_size, tok.model_type)
    print(f"wrote {out} ({load_tokenizer(out).get_piece_size()} pieces)")
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from jaxlm.config import load_config
    from jaxlm.data.shards import prepare

    config_path, overrides = _split_overrides(args.config)
    config = load_config(config_path, overrides)
    m = prepare(config, args.out, args.workers, int(args.shard_mb * 2**20), not args.no_progress)
    print(
        f"wrote {len(m['shards'])} shards ({m['resumed_shards']} kept from before): "
        f"{m['records']} documents, {m['tokens']} tokens -> {args.out}"
    )
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from jaxlm.config import load_config
    from jaxlm.info import format_info, model_info

    config_path, overrides = _split_overrides(args.config)
    config = load_config(config_path, overrides)
    print(format_info(config.name, model_info(config)))
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from jaxlm.aot import compile_train_step, parse_topology
    from jaxlm.aot_report import format_report, report_json
    from jaxlm.config import load_config

    config_path, overrides = _split_overrides(args.config)
    topology = parse_topology(args.topology)
    if args.slices < 1:
        raise JaxlmError(f"--slices {args.slices}: must be at least 1")
    if args.search:
        from jaxlm.aot_search import format_search, search

        results = search(
            config_path, overrides, topology, args.space or [], args.budget_s, args.slices
        )
        print(format_search(results, topology.hbm_bytes))
        return 0 if any(r.get("fits") for _, r in results) else 1
    config = load_config(config_path, overrides)
    report = compile_train_step(config, topology, args.slices, estimate=not args.no_estimate)
    print(json.dumps(report_json(report)) if args.json else format_report(report))
    return 0 if report.fits else 1


def cmd_convert(args: argparse.Namespace) -> int:
    from jaxlm.hf import convert_from_hf, convert_to_hf

    if args.config:  # key=value words argparse let through
        raise JaxlmError(f"convert takes no overrides: {' '.join(args.config)}")
    if args.direction == "from-hf":
        out = convert_from_hf(args.source, args.out)
        print(f"wrote {out}: config.yaml, tokenizer, params/ (train with init_from={out})")
    elif args.direction == "to-peft":
        from jaxlm.hf.peft import export_peft

        out = export_peft(args.source, args.out, args.base)
        print(f"wrote {out}: adapter_config.json, adapter_model.safetensors (PEFT)")
    else:
        if args.max_shard_mb <= 0:
            raise JaxlmError(f"--max-shard-mb {args.max_shard_mb}: must be positive")
        out = convert_to_hf(args.source, args.out, args.max_shard_mb * 2**20)
        print(f"wrote {out}: config.json, safetensors, tokenizer files")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxlm", description="Train language models with JAX.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train (or resume) a model from a YAML config")
    train.add_argument("config", nargs="+", help="CONFIG.yaml followed by key=value overrides")
    train.add_argument("--run-dir", help="run directory (default: runs/<config name>)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument(
        "--profile",
        action="store_true",
        help="trace steps 3..5 into RUN_DIR/profile (or train.profile_steps=[START,END])",
    )
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

    data = sub.add_parser("data", help="corpus tools")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    prep = data_sub.add_parser(
        "prepare", help="tokenize a config's corpus into ArrayRecord shards (resumable)"
    )
    prep.add_argument("config", nargs="+", help="CONFIG.yaml followed by key=value overrides")
    prep.add_argument("--out", required=True, help="output directory (then data.path=DIR)")
    prep.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    prep.add_argument("--shard-mb", type=float, default=64, help="source text per shard, MB")
    prep.add_argument("--no-progress", action="store_true", help="no progress bar")
    prep.set_defaults(func=cmd_data_prepare)

    aot = sub.add_parser(
        "compile", help="compile the train step for a Cloud TPU topology here (needs [tpu])"
    )
    aot.add_argument("config", nargs="+", help="CONFIG.yaml followed by key=value overrides")
    aot.add_argument("--topology", required=True, help="e.g. v5p-128, v5e-16, v5e-2x2")
    aot.add_argument("--slices", type=int, default=1, help="multislice: number of slices")
    aot.add_argument("--json", action="store_true", help="print the report as one JSON object")
    aot.add_argument(
        "--no-estimate",
        action="store_true",
        help="memory only: skip the step-time estimate (a scanned step compiles twice for it)",
    )
    aot.add_argument(
        "--search",
        action="store_true",
        help="compile remat x mesh x per-chip batch candidates; rank by fit (10%% of HBM "
        "free) and est. tokens/s/chip",
    )
    aot.add_argument(
        "--space",
        action="append",
        help="--search grid: KEY=V1,V2 (model.remat, mesh=fsdp,data, batch=rows per chip, "
        "train.grad_accum, any config key); repeatable",
    )
    aot.add_argument(
        "--budget-s", type=float, default=1800.0, help="--search: stop starting compiles after"
    )
    aot.set_defaults(func=cmd_compile)

    ev = sub.add_parser(
        "eval", help="perplexity, bits/byte, MLM accuracy, BLEU and ROUGE of a model"
    )
    ev.add_argument("model", nargs="?", help="run, model or Hugging Face directory")
    ev.add_argument(
        "--task",
        help="summarization, qa, translation or dialogue: the task's metrics on its bundled "
        "test split (or --data FILE in its format); with --predictions, JSONL of id/prediction",
    )
    ev.add_argument("--write-predictions", help="--task: also write the outputs (id/prediction)")
    what = ev.add_mutually_exclusive_group()
    what.add_argument(
        "--data", help="text set for loss metrics (default: the run's held-out split)"
    )
    what.add_argument("--pairs", help="JSONL of source/reference pairs: generate, then BLEU/ROUGE")
    ev.add_argument("--predictions", help="JSONL of prediction/reference pairs: BLEU/ROUGE only")
    ev.add_argument("--json", help="also write the results to this JSON file")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--seq-len", type=int, default=0, help="0 = the training length")
    ev.add_argument("--max-batches", type=int, default=0, help="0 = the whole set")
    ev.add_argument("--max-examples", type=int, default=0, help="--pairs, --task: 0 = all")
    ev.add_argument("--max-new-tokens", type=int, default=64)
    ev.add_argument("--source-field", default="src")
    ev.add_argument("--reference-field", default="tgt")
    ev.add_argument("--prediction-field", default="prediction")
    ev.set_defaults(func=cmd_eval, config=[])

    gen = sub.add_parser("generate", help="continue prompts with a trained or converted model")
    gen.add_argument("model", help="run, model or Hugging Face directory")
    gen.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    gen.add_argument("--prompt-file", help="a file of prompts, one a line")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=40, help="0 = off")
    gen.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    gen.add_argument("--stop", action="append", help="end a text after this string (repeatable)")
    gen.add_argument("--json", action="store_true", help="one JSON object per prompt")
    gen.set_defaults(func=cmd_generate, config=[])

    plot = sub.add_parser("plot", help="loss, eval loss, learning rate and tokens/s of runs")
    plot.add_argument("runs", nargs="+", help="run directories (their metrics.jsonl)")
    plot.add_argument("--out", default="runs.png", help="PNG file to write")
    plot.set_defaults(func=cmd_plot, config=[])

    sc = sub.add_parser("score", help="per-token log-probabilities, or BERT's mask guesses")
    sc.add_argument("model", help="run, model or Hugging Face directory")
    sc.add_argument("--text", help="the text to score")
    sc.add_argument("--file", help="a text file to score")
    sc.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sc.add_argument("--top-k", type=int, default=5, help="BERT: guesses per mask")
    sc.set_defaults(func=cmd_score, config=[])

    att = sub.add_parser("attention", help="draw one layer's and head's attention map")
    att.add_argument("model", help="run, model or Hugging Face directory")
    att.add_argument("--text", help="the text to attend over")
    att.add_argument("--file", help="a text file instead")
    att.add_argument("--layer", type=int, default=0)
    att.add_argument("--head", type=int, default=0)
    att.add_argument("--group", help="t5: encoder/self_attn, decoder/self_attn, ...cross_attn")
    att.add_argument("--out", default="attention.png", help="PNG file to write")
    att.set_defaults(func=cmd_attention, config=[])

    convert = sub.add_parser("convert", help="Hugging Face checkpoints in and out")
    conv_sub = convert.add_subparsers(dest="direction", required=True)
    from_hf = conv_sub.add_parser("from-hf", help="HF directory -> jaxlm model directory")
    from_hf.add_argument("source", help="Hugging Face directory (config.json, *.safetensors)")
    to_hf = conv_sub.add_parser("to-hf", help="jaxlm run or model directory -> HF directory")
    to_hf.add_argument("source", help="run directory or model directory")
    to_hf.add_argument("--max-shard-mb", type=int, default=5120, help="safetensors shard size")
    to_peft = conv_sub.add_parser("to-peft", help="LoRA run -> its adapter alone, PEFT format")
    to_peft.add_argument("source", help="LoRA run directory")
    to_peft.add_argument("--base", help="base_model_name_or_path (default: init_from=hf:'s)")
    for conv in (from_hf, to_hf, to_peft):
        conv.add_argument("out", help="output directory")
        conv.set_defaults(func=cmd_convert, config=[])
    return parser


_TPU_ENV = ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "TPU_NAME", "TPU_WORKER_ID")
_ACCELERATOR_DEVICES = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*", "/dev/kfd")


def quiet_without_accelerator() -> None:
    """Keep libtpu's TPU probe quiet on a machine with no TPU or GPU attached.

    libtpu (the test extra has it, for `jaxlm compile`) probes for a TPU whenever JAX
    starts, and without one prints errors that look like failures. Here JAX gets the
    CPU unless JAX_PLATFORMS says otherwise, and the probe gets the two answers it
    would look up (the compile-only topology API of `jaxlm compile` still loads
    libtpu). With a TPU attached or TPU variables set, nothing changes, so real TPU
    errors still show. Runs before JAX is imported: JAX reads these at start.
    """
    if any(os.environ.get(k) for k in _TPU_ENV):
        return
    if any(glob.glob(pattern) for pattern in _ACCELERATOR_DEVICES):
        return
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["TPU_ACCELERATOR_TYPE"] = "v5litepod-1"  # compile-only: --topology decides
    os.environ["TPU_WORKER_HOSTNAMES"] = "localhost"


def main(argv: list[str] | None = None) -> int:
    quiet_without_accelerator()
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
