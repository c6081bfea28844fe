"""Generation speed of jaxlm beside the PyTorch reference and Hugging Face, alternating.

New tokens/s for greedy decoding (fp32, a 32-token random prompt, 128 new tokens, no
early stop) at batch 1 and 8, on GPT-2-architecture models with random weights:

- jaxlm: `generate_ids` (prefill + `lax.while_loop` with a KV cache, one program;
  `first_call_s` is the first call, compile included);
- reference: `../shared/bench/torch_gpt_reference.py --generate` (PyTorch eager, KV
  cache, batch 1 only, as the script has no batch option for generation);
- hf: `transformers` `GPT2LMHeadModel.generate` (KV cache), skipped with a message
  when transformers is not installed.

Each measurement is a fresh subprocess and the sides alternate (jaxlm, reference, hf,
jaxlm, ...), so machine noise hits all of them; medians over the repeats, and the
ratios jaxlm / other pair by pair.

    python benchmarks/generate_speed.py [--configs tiny gpt2-small] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "bench" / "torch_gpt_reference.py"
CONFIGS = {
    "tiny": dict(d_model=256, n_layers=4, n_heads=4, vocab=8192),
    "gpt2-small": dict(d_model=768, n_layers=12, n_heads=12, vocab=50304),
}
PROMPT_LEN, NEW_TOKENS, THREADS = 32, 128, 2


def jax_worker(c: dict, batch: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import linen as nn

    from jaxlm.generation import generate_ids
    from jaxlm.model_config import ModelConfig
    from jaxlm.models import build_model

    config = ModelConfig(
        family="gpt2",
        vocab_size=c["vocab"],
        d_model=c["d_model"],
        n_layers=c["n_layers"],
        n_heads=c["n_heads"],
        max_len=PROMPT_LEN + NEW_TOKENS,
        scan_layers=False,
    )
    model = build_model(config)
    init = jax.jit(lambda r: model.init(r, jnp.zeros((1, 8), jnp.int32))["params"])
    params = nn.meta.unbox(init(jax.random.PRNGKey(0)))
    prompts = np.random.default_rng(2).integers(0, c["vocab"], (batch, PROMPT_LEN)).tolist()

    def run() -> float:
        start = time.perf_counter()
        out = generate_ids(model, params, prompts, max_new_tokens=NEW_TOKENS)
        elapsed = time.perf_counter() - start
        assert all(len(t) == NEW_TOKENS for t in out.tokens)
        return elapsed

    compile_s = run()
    times = [run() for _ in range(repeats)]
    return _rates(batch, times) | {"first_call_s": round(compile_s, 2)}


def hf_worker(c: dict, batch: int, repeats: int) -> dict:
    try:
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError as err:
        return {"skipped": f"transformers not installed ({err})"}
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=c["vocab"],
        n_positions=PROMPT_LEN + NEW_TOKENS,
        n_embd=c["d_model"],
        n_layer=c["n_layers"],
        n_head=c["n_heads"],
    )
    model = GPT2LMHeadModel(config).eval()
    gen = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, c["vocab"], (batch, PROMPT_LEN), generator=gen)
    mask = torch.ones_like(prompt)

    def run() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                prompt,
                attention_mask=mask,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=0,
            )
        elapsed = time.perf_counter() - start
        assert out.shape[1] == PROMPT_LEN + NEW_TOKENS
        return elapsed

    run()
    return _rates(batch, [run() for _ in range(repeats)])


def _rates(batch: int, times: list[float]) -> dict:
    rates = [batch * NEW_TOKENS / t for t in times]
    return {
        "new_tokens_per_sec": round(statistics.median(rates), 1),
        "new_tokens_per_sec_min": round(min(rates), 1),
        "new_tokens_per_sec_max": round(max(rates), 1),
    }


def reference(c: dict, repeats: int) -> dict:
    cmd = [
        sys.executable,
        str(REFERENCE),
        "--generate",
        f"--d-model={c['d_model']}",
        f"--n-layers={c['n_layers']}",
        f"--n-heads={c['n_heads']}",
        f"--vocab={c['vocab']}",
        f"--seq-len={PROMPT_LEN + NEW_TOKENS}",
        f"--prompt-len={PROMPT_LEN}",
        f"--new-tokens={NEW_TOKENS}",
        f"--gen-repeats={repeats}",
        f"--threads={THREADS}",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    keys = ("new_tokens_per_sec", "new_tokens_per_sec_min", "new_tokens_per_sec_max")
    return {k: result[k] for k in keys} | {"cache_check_passed": result["cache_check_passed"]}


def subprocess_worker(side: str, config: str, batch: int, repeats: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, config, str(batch), str(repeats)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if out.returncode:
        raise RuntimeError(f"{side} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds")
    parser.add_argument("--timed", type=int, default=3, help="timed calls per measurement")
    parser.add_argument("--no-hf", action="store_true", help="skip Hugging Face generate")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        side, config, batch, repeats = args.worker
        worker = jax_worker if side == "jaxlm" else hf_worker
        print(json.dumps(worker(CONFIGS[config], int(batch), int(repeats))))
        return 0

    runs: dict[str, list[dict]] = {}
    for round_ in range(args.repeats):
        for name in args.configs:
            c = CONFIGS[name]
            for batch in args.batches:
                sides = ["jaxlm", *(["reference"] if batch == 1 else []), "hf"]
                for side in sides:
                    if side == "hf" and args.no_hf:
                        continue
                    if side == "reference":
                        result = reference(c, args.timed)
                    else:
                        result = subprocess_worker(side, name, batch, args.timed)
                    runs.setdefault(f"{name}|{batch}|{side}", []).append(result)
                    rate = result.get("new_tokens_per_sec", result.get("skipped"))
                    print(f"round {round_ + 1}: {name} batch {batch} {side}: {rate}", flush=True)

    summary = summarize(runs)
    print(format_table(summary))
    load = os.getloadavg()
    print(f"load average at the end (1, 5, 15 min): {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    payload = {"prompt_len": PROMPT_LEN, "new_tokens": NEW_TOKENS, "threads": THREADS}
    payload["load_average"] = load
    payload |= {"runs": runs, "summary": summary}
    print(json.dumps(payload["summary"]))
    if args.json:
        Path(args.json).write_text(json.dumps(payload, indent=1))
    return 0


def summarize(runs: dict[str, list[dict]]) -> list[dict]:
    rows = []
    for key, results in runs.items():
        name, batch, side = key.split("|")
        if side == "jaxlm" or "skipped" in results[0]:
            continue
        mine = runs[f"{name}|{batch}|jaxlm"]
        ratios = [
            a["new_tokens_per_sec"] / b["new_tokens_per_sec"]
            for a, b in zip(mine, results, strict=False)
        ]
        rows.append(
            {
                "config": name,
                "batch": int(batch),
                "versus": side,
                "jaxlm_tok_s": statistics.median(r["new_tokens_per_sec"] for r in mine),
                "other_tok_s": statistics.median(r["new_tokens_per_sec"] for r in results),
                "ratio_median": round(statistics.median(ratios), 2),
                "ratio_min": round(min(ratios), 2),
                "ratio_max": round(max(ratios), 2),
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    head = "config      batch  versus     jaxlm tok/s  other tok/s  ratio (min-max)"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['config']:<11} {r['batch']:>5}  {r['versus']:<9} {r['jaxlm_tok_s']:>12.1f} "
            f"{r['other_tok_s']:>12.1f}  {r['ratio_median']:.2f} "
            f"({r['ratio_min']:.2f}-{r['ratio_max']:.2f})"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
