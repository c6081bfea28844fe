"""Write the bundled task splits under data/tasks/ from ../shared/data (see
data/tasks/README.md for the sources, licences and sizes).

    python scripts/split_tasks.py [--shared ../shared/data] [--out data/tasks]
    python scripts/split_tasks.py --training-files DIR   # fine-tuning files of the splits

Splits are by article (XQuAD) or paper (SciTLDR), so no test passage is seen in
training: XQuAD's 48 articles are shuffled with a fixed seed and TEST_ARTICLES of them
are the test split, for QA, translation and dialogue alike (QA keeps SQuAD's layout,
one passage a line with its questions, so no passage is stored twice); SciTLDR keeps its own
train/test papers, minus any train paper whose abstract is also a test one. The output
is deterministic: running it again writes the same bytes.

`--training-files DIR` writes, from the bundled train splits, what `jaxlm train` reads:
`DIR/<task>.sft.jsonl` ({"prompt", "completion"}, for decoders) and
`DIR/<task>.pairs.jsonl` ({"src", "tgt"}, for T5), in the prompt convention
`jaxlm eval --task` generates from (jaxlm/evaluation/tasks.py); dialogue trains on
data/tasks/dialogue/train.jsonl as it is.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SEED = 0
TEST_ARTICLES = 10  # of XQuAD's 48
SUMMARIZATION = {"train": 200, "test": 100}  # SciTLDR papers kept (files stay small)
SYSTEM = "Answer each question with a short span copied from the passage."


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    path.write_text(text, encoding="utf-8")


def paragraphs(qa: list[dict]) -> list[dict]:
    """XQuAD's questions grouped by passage, in file order: the paragraph id is
    `<title>/<index within the article>`, as in en_de_parallel.jsonl."""
    by_key: dict[tuple[str, str], dict] = {}
    count: dict[str, int] = defaultdict(int)
    for r in qa:
        key = (r["title"], r["context"])
        if key not in by_key:
            pid = f"{r['title']}/{count[r['title']]}"
            count[r["title"]] += 1
            by_key[key] = {"id": pid, "title": r["title"], "context": r["context"], "qas": []}
        by_key[key]["qas"].append(
            {"id": r["id"], "question": r["question"], "answers": r["answers"]}
        )
    return list(by_key.values())


def conversation(p: dict) -> dict:
    """A passage's questions as one chat: the passage and the first question in the
    first user turn, each answer (its first gold text) an assistant turn."""
    messages = [{"role": "system", "content": SYSTEM}]
    for i, q in enumerate(p["qas"]):
        text = f"{p['context']}\n\nQuestion: {q['question']}" if i == 0 else q["question"]
        messages += [
            {"role": "user", "content": text},
            {"role": "assistant", "content": q["answers"]["text"][0]},
        ]
    return {"id": p["id"], "title": p["title"], "messages": messages}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=REPO / "data" / "tasks")
    ap.add_argument("--training-files", type=Path, help="write fine-tuning files here instead")
    args = ap.parse_args(argv)
    if args.training_files:
        from jaxlm.evaluation.tasks import TASKS, training_records

        for name, task in TASKS.items():
            if task.generated:
                rows = training_records(name)
                write_jsonl(args.training_files / f"{name}.sft.jsonl", rows)
                pairs = [{"src": r["prompt"], "tgt": r["completion"]} for r in rows]
                write_jsonl(args.training_files / f"{name}.pairs.jsonl", pairs)
                print(f"{name}: {len(rows)} training examples")
        return
    src, out = args.shared, args.out

    qa = read_jsonl(src / "xquad" / "en_qa.jsonl")
    titles = sorted({r["title"] for r in qa})
    random.Random(SEED).shuffle(titles)
    test_titles = set(titles[:TEST_ARTICLES])
    split_of = {t: "test" if t in test_titles else "train" for t in titles}

    paras = paragraphs(qa)
    title_of_question = {q["id"]: p["title"] for p in paras for q in p["qas"]}
    for split in ("train", "test"):
        mine = [p for p in paras if split_of[p["title"]] == split]
        write_jsonl(out / "qa" / f"{split}.jsonl", mine)
        write_jsonl(out / "dialogue" / f"{split}.jsonl", [conversation(p) for p in mine])

    pairs = read_jsonl(src / "xquad" / "en_de_parallel.jsonl")
    for split in ("train", "test"):
        rows = []
        for r in pairs:
            title = r["id"].rsplit("/", 1)[0] if r["kind"] == "paragraph" else None
            title = title or title_of_question[r["id"]]
            if split_of[title] == split:
                rows.append({"id": r["id"], "title": title, "kind": r["kind"], **_pair(r)})
        write_jsonl(out / "translation" / f"{split}.jsonl", rows)

    tldr = {s: read_jsonl(src / "scitldr" / f"{s}.jsonl") for s in ("train", "test")}
    test = tldr["test"][: SUMMARIZATION["test"]]
    seen = {r["document"] for r in tldr["test"]} | {r["paper_id"] for r in tldr["test"]}
    train = [r for r in tldr["train"] if r["document"] not in seen and r["paper_id"] not in seen]
    for split, rows in (("train", train[: SUMMARIZATION["train"]]), ("test", test)):
        write_jsonl(
            out / "summarization" / f"{split}.jsonl",
            [
                {
                    "id": r["paper_id"],
                    "document": r["document"],
                    "summary": r["summary"],
                    "references": r["references"],
                }
                for r in rows
            ],
        )
    for path in sorted(out.glob("*/*.jsonl")):
        print(
            f"{path.relative_to(out)}: {len(read_jsonl(path))} records, {path.stat().st_size:,} B"
        )


def _pair(r: dict) -> dict:
    return {"src": r["src"], "tgt": r["tgt"]}


if __name__ == "__main__":
    main()
