"""A bundled, checkable instruction corpus in English and Chinese for the demo and the tests.

Every answer can be verified by a program: arithmetic, unit conversion, sorting, extracting a
field from a JSON financial report, and topic classification of generated headlines. Rows are
instruction/input/output triples with a `task` label and the metric that scores them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

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
    km = rng.randint(1, 50)
    if rng.random() < 0.5:
        return {"instruction": f"Convert {km} km to metres.", "output": f"{km * 1000} m", "task": "units", "metric": "exact_match"}
    kg = rng.randint(1, 20)
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


def write_corpus(directory: str | Path, n_train: int = 2000, n_test: int = 200, seed: int = 0) -> dict[str, Path]:
    """Write `train.jsonl`, a disjoint-seed `test.jsonl` (prompt/reference/task/metric) and `synonyms.tsv`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"train": directory / "train.jsonl", "test": directory / "test.jsonl", "synonyms": directory / "synonyms.tsv"}
    with open(paths["train"], "w", encoding="utf-8") as f:
        for row in generate_rows(n_train, seed):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    with open(paths["test"], "w", encoding="utf-8") as f:
        for row in generate_rows(n_test, seed + 10_000):
            prompt = row["instruction"] + ("\n" + row["input"] if row.get("input") else "")
            f.write(json.dumps({"prompt": prompt, "reference": row["output"], "task": row["task"], "metric": row["metric"]}, ensure_ascii=False) + "\n")
    paths["synonyms"].write_text("\n".join("\t".join(g) for g in SYNONYMS) + "\n", encoding="utf-8")
    return paths
