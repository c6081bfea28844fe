"""The training loop: config -> data, mesh, state -> steps, logs and checkpoints.

Everything that can be wrong with the user's input (config, data, tokenizer, mesh
shape) is checked before the first compile. A run directory holds the resolved
config, the tokenizer, metrics.jsonl and checkpoints/, and training in an existing
run directory resumes from its latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import jax
import numpy as np
from etils import epath
from tqdm import tqdm

from jaxlm import checkpoint as ckpt
from jaxlm import sharding as shd
from jaxlm.config import Config, check_trainable, load_config, to_yaml
from jaxlm.data import mixture, tasks
from jaxlm.data.pipeline import eval_batches, make_dataset
from jaxlm.data.tokenizer import run_tokenizer
from jaxlm.errors import JaxlmError, NonFiniteLoss
from jaxlm.generation import generate_ids
from jaxlm.model_config import FAMILIES, flops_per_token
from jaxlm.observe.profile import StepProfiler
from jaxlm.observe.tensorboard import TensorBoardWriter
from jaxlm.paths import as_path
from jaxlm.train import faults
from jaxlm.train.init_from import check_init_from, load_init_params, resolve_init_from
from jaxlm.train.metrics import MetricsWriter, peak_flops_per_device, perplexity
from jaxlm.train.objectives import for_model
from jaxlm.train.preemption import Preempted, PreemptionGuard
from jaxlm.train.state import TrainState, count_params, init_state
from jaxlm.train.step import batch_shardings, train_steps


@dataclass
class TrainResult:
    state: TrainState
    config: Config
    history: list[dict[str, Any]] = field(default_factory=list)
    sample: str = ""


def default_run_dir(config: Config) -> epath.Path:
    return as_path("runs") / config.name


def resolve_vocab(config: Config, tokenizer_size: int) -> Config:
    if config.tokenizer.path:  # a given tokenizer's size, not the one a trained would have
        config = config.replace(tokenizer={"vocab_size": tokenizer_size})
    if config.model.vocab_size == 0:
        return config.replace(model={"vocab_size": tokenizer_size})
    if config.model.vocab_size < tokenizer_size:
        raise JaxlmError(
            f"config key 'model.vocab_size': {config.model.vocab_size} is smaller than the "
            f"tokenizer's {tokenizer_size} pieces"
        )
    return config


def check_resumable(run_dir: epath.Path, config: Config) -> None:
    """Refuse to resume checkpoints of a different model or tokenizer (the mesh may change)."""
    saved = run_dir / "config.yaml"
    if not saved.is_file() or not any((run_dir / "checkpoints").glob("[0-9]*")):
        return
    old = load_config(saved)
    diffs = [
        f"{section}.{f.name} is {getattr(getattr(old, section), f.name)!r} there, "
        f"{getattr(getattr(config, section), f.name)!r} here"
        for section in ("model", "tokenizer")
        for f in dataclasses.fields(getattr(config, section))
        if getattr(getattr(old, section), f.name) != getattr(getattr(config, section), f.name)
    ]
    if diffs:
        raise JaxlmError(
            f"{run_dir} holds checkpoints of another model: {'; '.join(diffs[:3])}. "
            "Use another --run-dir, or the config saved there"
        )


def _global_batch(batch: dict[str, np.ndarray], shardings: dict) -> dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in batch.items()}


_STEP_KEYS = ("loss", "grad_norm", "lr", "tokens", "nonfinite_steps")


def step_record(step: int, metrics: dict, tokens_per_sec: float, mfu: float) -> dict[str, Any]:
    """One line of metrics.jsonl from a step's (host) metrics."""
    loss = float(metrics["loss"])
    return {
        "step": step,
        "loss": loss,
        "perplexity": perplexity(loss),
        "grad_norm": float(metrics["grad_norm"]),
        "lr": float(metrics["lr"]),
        "tokens_per_sec": tokens_per_sec,
        "mfu": mfu,
        "nonfinite_steps": int(metrics["nonfinite_steps"]),
    } | {k: float(v) for k, v in metrics.items() if k not in _STEP_KEYS}  # BERT's accuracies


def evaluate(eval_fn, params, batches, shardings, summarize) -> dict[str, float]:
    """The objective's metrics over all eval batches, from their summed statistics."""
    sums: dict[str, float] = {}
    for batch in batches:
        out = jax.device_get(eval_fn(params, _global_batch(batch, shardings)))
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    return {k: float(v) for k, v in summarize(sums).items()}


def eval_record(metrics: dict[str, float], per_token: bool) -> dict[str, float]:
    """`eval_` metrics, with a perplexity when the loss is a mean over tokens."""
    record = {f"eval_{k}": v for k, v in metrics.items()}
    if per_token:
        record["eval_perplexity"] = perplexity(metrics["loss"])
    return record


def _clear_nonfinite(state: TrainState) -> TrainState:
    """Under `stop` the step freezes while `state.nonfinite` is above zero, so the last
    good state, saved or restored, must count zero, or a resumed run freezes at once."""
    return state.replace(nonfinite=state.nonfinite * 0)


def _stop_on_nonfinite(
    checkpointer: ckpt.Checkpointer, state: TrainState, data_iter, checked: tuple[int, dict]
) -> None:
    """Save the frozen last good state (train.nonfinite=stop) and end the run.

    The loop only looks at sync points, so it has read past the good step; the data
    position goes back to the last checked step's and forward to the good one's, so a
    resume sees the same batches as an uninterrupted run."""
    good = int(state.step)
    checked_step, position = checked
    data_iter.set_state(position)
    for _ in range(good - checked_step):
        next(data_iter)
    checkpointer.save(good, _clear_nonfinite(state), data_iter, force=True)
    checkpointer.close()
    raise NonFiniteLoss(
        f"non-finite loss or gradients at step {good + 1} (train.nonfinite=stop); "
        f"the last good state is in {checkpointer.step_dir(good)}"
    )


def sample_text(config: Config, model, params, tokenizer) -> str:
    """About `train.sample_tokens` tokens: documents generated one after another."""
    t_cfg = config.train
    prompt = tokenizer.encode(t_cfg.sample_prompt) if t_cfg.sample_prompt else []
    buffer_len = min(config.model.max_len, max(t_cfg.seq_len, len(prompt) + 1))
    prompt = [tokenizer.bos_id(), *prompt][-buffer_len + 1 :]  # documents start with BOS
    eos = tokenizer.eos_id()
    pieces, n_tokens = [], 0
    for i in range(8):  # a document can end early at EOS
        ids = generate_ids(
            model,
            params,
            [prompt],
            max_new_tokens=max(1, min(t_cfg.sample_tokens - n_tokens, buffer_len - len(prompt))),
            temperature=0.8,
            top_k=40,
            seed=config.seed + i,
            eos_id=eos,
        ).tokens[0]
        ids = ids[:-1] if ids and ids[-1] == eos else ids
        pieces.append(t_cfg.sample_prompt + tokenizer.decode(ids))
        n_tokens += len(prompt) + len(ids) + 1
        if n_tokens >= t_cfg.sample_tokens:
            break
    return "\n\n".join(pieces)


def train(
    config: Config,
    run_dir: str | os.PathLike | None = None,
    progress: bool = True,
    stop_at: int | None = None,
) -> TrainResult:
    """Train (or resume) `config` in `run_dir`.

    `stop_at` ends this session early at that step, with a checkpoint, as a
    preemption would; the schedule still spans `train.steps`.
    """
    check_trainable(config)
    check_init_from(config)
    config = resolve_init_from(config)  # hf:PATH: its architecture and tokenizer
    run_dir = as_path(run_dir) if run_dir is not None else default_run_dir(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    t_cfg = config.train
    n_proc, proc = jax.process_count(), jax.process_index()
    if t_cfg.batch_size % n_proc:
        raise JaxlmError(
            f"config key 'train.batch_size': {t_cfg.batch_size} is not divisible by "
            f"{n_proc} processes"
        )
    local_batch = t_cfg.batch_size // n_proc

    # Mesh first: a shape that can't work fails before any data is read.
    mesh = shd.make_mesh(config.mesh)
    rules = shd.logical_rules(config.mesh)
    data_sharding = shd.batch_sharding(mesh, rules)
    shd.check_batch(t_cfg.batch_size, data_sharding, t_cfg.seq_len, t_cfg.grad_accum)
    objective = for_model(config.model)
    if config.data.target_len and objective.target_keys:
        shd.check_batch(t_cfg.batch_size, data_sharding, config.data.target_len)
    data_shardings = batch_shardings(mesh, rules, objective.batch_ranks)

    # Data and tokenizer: cheap, and the commonest source of user errors.
    if mixture.uses_token_data(config):  # token shards or data.mixture
        train_docs, held_out, tokenizer, make_stream = mixture.token_data(config, run_dir)
    else:
        train_docs, held_out = tasks.train_and_held_out(config)
        tasks.check_enough(config, train_docs)
        sample = partial(tasks.tokenizer_corpus, config, train_docs)  # read if trained
        tokenizer = run_tokenizer(
            config.tokenizer, run_dir, sample, tasks.tokenizer_symbols(config)
        )
        # SFT examples are rendered and tokenized here, before any compile.
        train_docs, held_out = tasks.encode_splits(
            config, tokenizer, [train_docs, held_out], log=proc == 0
        )
        make_stream = tasks.stream_maker(config, tokenizer)
    config = resolve_vocab(config, tokenizer.get_piece_size())
    check_resumable(run_dir, config)
    if proc == 0:  # hosts may share a gs:// run directory
        (run_dir / "config.yaml").write_text(to_yaml(config))

    # Model and state shardings: every shape is checked here, before compiling.
    model, abstract, shardings, tx, (train_fn, eval_fn) = train_steps(config, mesh, rules)
    eval_model = model.clone(deterministic=True)

    train_ds = make_dataset(
        train_docs,
        tokenizer,
        seq_len=t_cfg.seq_len,
        batch_size=local_batch,
        seed=config.seed,
        shuffle=config.data.shuffle,
        process_index=proc,
        process_count=n_proc,
        num_streams=config.data.streams,
        make_stream=make_stream,
    )
    data_iter = iter(train_ds)
    held_out_batches = eval_batches(
        held_out,
        tokenizer,
        seq_len=t_cfg.seq_len,
        batch_size=local_batch,
        max_batches=t_cfg.eval_batches,
        process_index=proc,
        process_count=n_proc,
        num_streams=config.data.streams,
        make_stream=make_stream,
    )

    checkpointer = ckpt.Checkpointer(run_dir / "checkpoints", config.checkpoint)
    state = checkpointer.restore_latest(abstract, data_iter, config.checkpoint.fallback)
    if state is not None:
        print(f"resumed from {checkpointer.step_dir(int(state.step))}")
        if t_cfg.nonfinite == "stop":
            state = _clear_nonfinite(state)
    else:
        state = init_state(
            model,
            tx,
            t_cfg.seq_len,
            shardings,
            jax.random.PRNGKey(config.seed),
            mesh,
            rules,
        )
        if config.init_from:  # fine-tuning: start from a converted or HF checkpoint
            state = state.replace(params=load_init_params(config, state.params))
    start = int(state.step)

    n_params = count_params(state.params)
    fpt = flops_per_token(config.model, n_params, t_cfg.seq_len)
    peak = peak_flops_per_device(t_cfg.peak_tflops) * jax.device_count()
    writer = MetricsWriter(run_dir / "metrics.jsonl") if proc == 0 else None
    board = TensorBoardWriter(run_dir, to_yaml(config)) if proc == 0 and t_cfg.tensorboard else None
    result = TrainResult(state=state, config=config)
    tokens_per_step = t_cfg.batch_size * t_cfg.seq_len

    bar = tqdm(
        total=t_cfg.steps,
        initial=start,
        disable=not progress or proc != 0,
        desc=config.name,
        unit="step",
        dynamic_ncols=True,
    )
    if t_cfg.eval_on_start and start == 0:  # the starting model, before any update
        evaluated = evaluate(
            eval_fn, state.params, held_out_batches, data_shardings, objective.summarize
        )
        record = {"step": 0} | eval_record(evaluated, objective.per_token)
        result.history.append(record)
        if writer:
            writer.write(record)
        if board:
            board.scalars(record)
    last_time, last_step = time.perf_counter(), start
    end = t_cfg.steps if stop_at is None else min(stop_at, t_cfg.steps)
    guard = PreemptionGuard(enabled=n_proc == 1)  # multi-host: JAX's preemption service
    checked = (start, data_iter.get_state())  # stop: the last step seen finite, its position
    profiler = StepProfiler(run_dir, list(t_cfg.profile_steps), start + 1, end)
    with guard:
        for step in range(start + 1, end + 1):
            local = faults.maybe_poison(step, next(data_iter), config.model.vocab_size)
            profiler.before(step)
            state, metrics = train_fn(state, _global_batch(local, data_shardings))
            profiler.after(step, state)
            bar.update(1)
            is_last = step == end
            preempted = guard.requested or checkpointer.manager.reached_preemption(step)
            do_eval = step % t_cfg.eval_every == 0 or is_last
            do_save = step % config.checkpoint.every == 0 or is_last or preempted
            do_log = step % t_cfg.log_every == 0 or do_eval
            if do_log or (do_save and t_cfg.nonfinite == "stop"):
                metrics = jax.device_get(metrics)  # the only host sync in the loop
                if t_cfg.nonfinite == "stop" and metrics["nonfinite_steps"] > 0:
                    if writer:
                        writer.close()
                    if board:
                        board.close()
                    profiler.close()
                    _stop_on_nonfinite(checkpointer, state, data_iter, checked)
                if t_cfg.nonfinite == "stop":
                    checked = (step, data_iter.get_state())
            if do_log:
                now = time.perf_counter()
                tok_s = tokens_per_step * (step - last_step) / (now - last_time)
                record = step_record(step, metrics, tok_s, fpt * tok_s / peak)
                if do_eval:
                    evaluated = evaluate(
                        eval_fn, state.params, held_out_batches, data_shardings, objective.summarize
                    )
                    record |= eval_record(evaluated, objective.per_token)
                result.history.append(record)
                if writer:
                    writer.write(record)
                if board:
                    board.scalars(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{tok_s:,.0f}")
                last_time, last_step = time.perf_counter(), step
            checkpointer.save(step, state, data_iter, force=is_last or preempted)
            faults.maybe_kill_during_save(step)
            checkpointer.poll()
            if preempted:
                profiler.close()
                if writer:
                    writer.close()
                if board:
                    board.close()
                bar.close()
                checkpointer.close()
                raise Preempted(step, str(checkpointer.step_dir(step)))
    bar.close()
    profiler.close()
    if writer:
        writer.close()
    checkpointer.close()
    result.state = state

    decoder = FAMILIES[config.model.family].kind == "decoder"  # continues text
    if t_cfg.sample_tokens and decoder and proc == 0 and end == t_cfg.steps:
        result.sample = sample_text(config, eval_model, jax.device_get(state.params), tokenizer)
        if board:
            board.text("sample", result.sample, end)
    if board:
        board.close()
    return result
