"""A bundled, checkable instruction corpus in English and Chinese for the demo and the tests.

Every answer can be verified by a program: arithmetic, unit conversion, sorting, extracting a
field from a JSON financial report, and topic classification of generated headlines. Rows are
instruction/input/output triples with a `task` label and the metric that scores them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from distillery.data.normalize import normalize_text

TOPICS = {
    "sports": (["team", "coach", "match", "league", "goal"], ["球队", "教练", "比赛", "联赛", "进球"]),
    "finance": (["stocks", "bank", "profit", "market", "bond"], ["股票", "银行", "利润", "市场", "债券"]),
    "health": (["doctor", "ECG", "hospital", "vaccine", "patient"], ["医生", "心电图", "医院", "疫苗", "患者"]),
    "tech": (["chip", "software", "robot", "cloud", "model"], ["芯片", "软件", "机器人", "云", "模型"]),
}
VERBS_EN = ["rises", "falls", "wins", "announces", "expands", "reports"]
VERBS_ZH = ["上涨", "下跌", "获胜", "宣布", "扩张", "报告"]

# Synonym groups (TSV lines) used by the demo's term-replacement augmentation.
SYNONYMS = [
    ["心电图", "ECG", "electrocardiogram"],
    ["医生", "physician"],
    ["利润", "盈利", "profit"],
    ["股票", "stocks", "equities"],
    ["add", "sum"],
]


def _arithmetic(rng: random.Random) -> dict:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    if rng.random() < 0.5:
        return {"instruction": f"Add {a} and {b}.", "output": str(a + b), "task": "arithmetic", "metric": "exact_match"}
    return {"instruction": f"计算 {a} 加 {b} 等于多少？", "output": str(a + b), "task": "arithmetic", "metric": "exact_match"}


def _units(rng: random.Random) -> dict:
    # 500 values per language: a few thousand training rows would hold every prompt of 1-50 km
    # and 1-20 kg, leaving no unit prompt for the held-out set.
    km = rng.randint(1, 500)
    if rng.random() < 0.5:
        return {"instruction": f"Convert {km} km to metres.", "output": f"{km * 1000} m", "task": "units", "metric": "exact_match"}
    kg = rng.randint(1, 500)
    return {"instruction": f"把 {kg} 千克换算成克。", "output": f"{kg * 1000} 克", "task": "units", "metric": "exact_match"}


def _sorting(rng: random.Random) -> dict:
    xs = [rng.randint(0, 99) for _ in range(rng.randint(3, 5))]
    prompt = "Sort ascending:" if rng.random() < 0.5 else "从小到大排序："
    return {
        "instruction": prompt,
        "input": " ".join(map(str, xs)),
        "output": " ".join(map(str, sorted(xs))),
        "task": "sorting",
        "metric": "exact_match",
    }


def _extract(rng: random.Random) -> dict:
    report = {
        "company": rng.choice(["Acme", "Zenith", "华信", "长江"]),
        "year": rng.randint(2015, 2025),
        "revenue": rng.randint(100, 999),
        "profit": rng.randint(10, 99),
    }
    field = rng.choice(["revenue", "profit", "year"])
    instr = f"Extract the {field} from the report." if rng.random() < 0.5 else f"从财务报告中提取 {field}。"
    return {
        "instruction": instr,
        "input": json.dumps(report, ensure_ascii=False),
        "output": str(report[field]),
        "task": "extract",
        "metric": "exact_match",
    }


def _classify(rng: random.Random) -> dict:
    topic = rng.choice(sorted(TOPICS))
    en, zh = TOPICS[topic]
    if rng.random() < 0.5:
        headline = f"{rng.choice(en).capitalize()} {rng.choice(VERBS_EN)} as {rng.choice(en)} news spreads"
        instr = "Classify the headline's topic (sports, finance, health, tech)."
    else:
        headline = f"{rng.choice(zh)}{rng.choice(VERBS_ZH)}，{rng.choice(zh)}受关注"
        instr = "判断新闻标题的主题（sports, finance, health, tech）。"
    return {"instruction": instr, "input": headline, "output": topic, "task": "classify", "metric": "accuracy"}


GENERATORS = [_arithmetic, _units, _sorting, _extract, _classify]


def generate_rows(n: int, seed: int = 0) -> list[dict]:
    """`n` instruction rows cycling through the task generators, reproducible under `seed`."""
    rng = random.Random(seed)
    return [GENERATORS[i % len(GENERATORS)](rng) for i in range(n)]


def prompt_of(row: dict) -> str:
    """The user prompt of an instruction row: the instruction, then the input on its own line (as prepare joins them)."""
    return row["instruction"] + ("\n" + row["input"] if row.get("input") else "")


def held_out_rows(n: int, seed: int, exclude: set[str], max_draws: int = 10_000) -> list[dict]:
    """`n` rows cycling through the generators like `generate_rows`, none of whose normalised prompt is in `exclude`.

    A row whose prompt is excluded is drawn again from the same task, so the task mix stays that of
    `generate_rows`. Raises ValueError when a task finds no free prompt in `max_draws` draws.
    """
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        gen = GENERATORS[i % len(GENERATORS)]
        for _ in range(max_draws):
            row = gen(rng)
            if normalize_text(prompt_of(row)) not in exclude:
                break
        else:
            raise ValueError(f"write_corpus: no '{row['task']}' prompt outside the {len(exclude):,} training prompts "
                             f"in {max_draws:,} draws; lower n_train")
        rows.append(row)
    return rows


def write_corpus(directory: str | Path, n_train: int = 2000, n_test: int = 200, seed: int = 0,
                 n_labelled: int = 0, n_prompts: int = 0) -> dict[str, Path]:
    """Write `train.jsonl`, a held-out `test.jsonl` (prompt/reference/task/metric) and `synonyms.tsv`;
    with `n_labelled` / `n_prompts` also `labelled.jsonl` (a small labelled set drawn apart from
    train.jsonl) and `prompts.jsonl` (unlabelled `{prompt, task}` rows for `distillery generate`).

    No test prompt equals a training prompt of any of these files after `normalize_text` (what
    prepare applies): test rows come from another seed, and a row whose prompt a training file
    holds is drawn again. Prepare's augmentation rewrites training prompts later; those rewrites
    are not excluded here.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"train": directory / "train.jsonl", "test": directory / "test.jsonl", "synonyms": directory / "synonyms.tsv"}
    files: dict[str, list[dict]] = {"train": generate_rows(n_train, seed)}
    if n_labelled:
        paths["labelled"] = directory / "labelled.jsonl"
        files["labelled"] = generate_rows(n_labelled, seed + 20_000)
    if n_prompts:
        paths["prompts"] = directory / "prompts.jsonl"
        files["prompts"] = [{"prompt": prompt_of(r), "task": r["task"]} for r in generate_rows(n_prompts, seed + 30_000)]
    for name, rows in files.items():
        with open(paths[name], "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    seen = _training_prompts(paths)
    with open(paths["test"], "w", encoding="utf-8") as f:
        for row in held_out_rows(n_test, seed + 10_000, seen):
            f.write(json.dumps({"prompt": prompt_of(row), "reference": row["output"], "task": row["task"], "metric": row["metric"]}, ensure_ascii=False) + "\n")
    paths["synonyms"].write_text("\n".join("\t".join(g) for g in SYNONYMS) + "\n", encoding="utf-8")
    # Checked on the files as written, so what the demo evaluates on is what was verified.
    train_prompts = _training_prompts(paths)
    test_prompts = [json.loads(line)["prompt"] for line in paths["test"].read_text(encoding="utf-8").splitlines()]
    shared = [p for p in test_prompts if normalize_text(p) in train_prompts]
    if shared:
        raise RuntimeError(f"write_corpus: {len(shared)} test prompts occur in the training files, e.g. {shared[0]!r}")
    return paths


def _training_prompts(paths: dict[str, Path]) -> set[str]:
    """Normalised prompts of every training file written (train, labelled, prompts)."""
    out = set()
    for name in ("train", "labelled", "prompts"):
        if name in paths and paths[name].exists():
            for line in paths[name].read_text(encoding="utf-8").splitlines():
                row = json.loads(line)
                out.add(normalize_text(row["prompt"] if "prompt" in row else prompt_of(row)))
    return out
