"""The `jaxlm` commands that use a trained run or model directory: eval, generate,
score, attention and plot. Argument parsing stays in `jaxlm.cli`; each command loads
what it needs when it runs, so `jaxlm --help` imports none of it.
"""

from __future__ import annotations

import argparse
import json

from jaxlm.errors import JaxlmError


def cmd_eval(args: argparse.Namespace) -> int:
    from jaxlm.data.seq2seq import read_pairs
    from jaxlm.data.tasks import read_examples, train_and_held_out
    from jaxlm.evaluation import (
        evaluate_model,
        format_table,
        generate_texts,
        overlap_scores,
        write_json,
    )
    from jaxlm.pretrained import load_pretrained

    for flag in ("batch_size", "max_new_tokens"):
        if getattr(args, flag) < 1:
            raise JaxlmError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be positive")
    if args.predictions and (args.data or args.pairs) and not args.task:
        raise JaxlmError("--predictions FILE holds the references; --data and --pairs do not apply")
    if args.task:  # a bundled task (jaxlm/evaluation/tasks.py), or --data in its format
        from jaxlm.evaluation.tasks import evaluate_task

        if args.pairs:
            raise JaxlmError("--task reads its own data (or --data FILE); --pairs does not apply")
        results, title = evaluate_task(
            args.task,
            model=args.model,
            data=args.data,
            predictions=args.predictions,
            max_examples=args.max_examples,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            overrides=args.config,
            write_predictions=args.write_predictions,
        )
    elif args.predictions:  # scores of given outputs: no model needed
        flags = ("--predictions", "--prediction-field", "--reference-field")
        pairs = read_pairs(args.predictions, args.prediction_field, args.reference_field, flags)
        results = overlap_scores([p for p, _ in pairs], [r for _, r in pairs])
        title = f"{args.predictions}"
    elif not args.model:
        raise JaxlmError("eval needs a MODEL (run, model or HF directory), or --predictions")
    else:
        pairs = []  # read first: a bad file fails before the model loads
        if args.pairs:
            flags = ("--pairs", "--source-field", "--reference-field")
            pairs = read_pairs(args.pairs, args.source_field, args.reference_field, flags)
        pretrained = load_pretrained(args.model, overrides=args.config)
        config = pretrained.config
        if args.pairs:
            if args.max_examples:
                pairs = pairs[: args.max_examples]
            outputs = generate_texts(
                pretrained,
                [s for s, _ in pairs],
                max_new_tokens=args.max_new_tokens,
                batch_size=args.batch_size,
            )
            results = overlap_scores(outputs, [r for _, r in pairs])
            title = f"{args.model} on {args.pairs} (greedy, {args.max_new_tokens} new tokens)"
        else:
            if args.data:
                path = args.data
                examples = read_examples(config.replace(data={"path": path}))
            else:  # the run's own held-out set, as in training
                path = config.data.eval_path or config.data.path
                examples = train_and_held_out(config)[1]
            results = evaluate_model(
                pretrained,
                examples,
                batch_size=args.batch_size,
                seq_len=args.seq_len,
                max_batches=args.max_batches,
            )
            split = not (args.data or config.data.eval_path)
            title = f"{args.model} on {path}" + (" (held-out split)" if split else "")
    print(format_table(results, title))
    if args.json:
        write_json(results, args.json)
        print(f"wrote {args.json}")
    return 0


GENERATE_BATCH = 8  # prompts per generation call of `jaxlm generate`


def cmd_generate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from jaxlm.pipeline import pipeline

    prompts = list(args.prompt or [])
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise JaxlmError(f"--prompt-file {path}: no such file")
        prompts += [line for line in path.read_text(encoding="utf-8").splitlines() if line]
    if not prompts:
        raise JaxlmError("generate needs --prompt TEXT or --prompt-file FILE")
    if args.max_new_tokens < 1:
        raise JaxlmError(f"--max-new-tokens {args.max_new_tokens}: must be positive")
    greedy = args.greedy or args.temperature <= 0
    if not greedy and not 0 < args.top_p <= 1:
        raise JaxlmError(f"--top-p {args.top_p}: must be in (0, 1]")
    generator = pipeline(None, args.model, overrides=args.config)  # the task by the model
    # Batches of GENERATE_BATCH prompts, each printed as it is done; the bar shows on a
    # terminal only (disable=None), so a prompt file's progress is visible there.
    starts = range(0, len(prompts), GENERATE_BATCH)
    for start in tqdm(starts, "generating", disable=None if len(starts) > 1 else True):
        batch = prompts[start : start + GENERATE_BATCH]
        outputs = generator(
            batch,
            max_new_tokens=args.max_new_tokens,
            do_sample=not greedy,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            stop_strings=args.stop or (),
        )
        for i, (prompt, rows) in enumerate(zip(batch, outputs, strict=True), start):
            text = rows[0]["generated_text"]
            record = {"prompt": prompt, "generated_text": text}
            tqdm.write(
                json.dumps(record, ensure_ascii=False)
                if args.json
                else ("\n---\n" if i else "") + text
            )
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from jaxlm.observe.plot import plot_runs

    if args.config:
        raise JaxlmError(f"plot takes no overrides: {' '.join(args.config)}")
    plot_runs(args.runs, args.out)
    print(f"wrote {args.out}")
    return 0


def _read_text(args: argparse.Namespace) -> str:
    from pathlib import Path

    if args.file:
        path = Path(args.file)
        if not path.is_file():
            raise JaxlmError(f"--file {path}: no such file")
        return path.read_text(encoding="utf-8")
    if args.text is None:
        raise JaxlmError(f"{args.command} needs --text TEXT or --file FILE")
    return args.text


def cmd_score(args: argparse.Namespace) -> int:

    from jaxlm.observe.score import format_scores, score
    from jaxlm.pretrained import load_pretrained

    text = _read_text(args)
    if args.top_k < 1:
        raise JaxlmError(f"--top-k {args.top_k}: must be positive")
    result = score(load_pretrained(args.model, overrides=args.config), text, args.top_k)
    print(json.dumps(result, ensure_ascii=False) if args.json else format_scores(result))
    return 0


def cmd_attention(args: argparse.Namespace) -> int:
    from jaxlm.observe.attention_maps import attention_maps, draw_map, pick
    from jaxlm.pretrained import load_pretrained

    text = _read_text(args)
    tokens, maps = attention_maps(load_pretrained(args.model, overrides=args.config), text)
    probs = pick(maps, args.group, args.layer, args.head)
    group = args.group or next(iter(maps))
    draw_map(probs, tokens, f"{group} layer {args.layer} head {args.head}", args.out)
    print(f"wrote {args.out}")
    return 0
