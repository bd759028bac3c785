"""`distillery generate` without Ray: the config's checks, the teacher it picks, prompt rows, the
repetition filter, keys and seeds; every bad setting fails before Ray starts, naming the key."""

from __future__ import annotations

import json

import pytest

from distillery.cli import EXIT_CONFIG, main
from distillery.config import ConfigError, load_config
from distillery.data.answers import METRICS
from distillery.data.normalize import normalize_fields, to_messages
from distillery.data.validate import Invalid, validate, validate_prompt
from distillery.distill.generate import prompt_messages, repeat_fraction, sample_seed, sequence_key, validate_generate

SRC = "generate.sources=[{path: p.jsonl, format: prompts}]"


@pytest.mark.parametrize("overrides, words", [
    (["generate.n=0"], ["generate.n", "greater than or equal to 1"]),
    (["generate.temperature=-0.5"], ["generate.temperature", "greater than or equal to 0"]),
    (["generate.top_p=0"], ["generate.top_p", "greater than 0"]),
    (["generate.top_p=1.5"], ["generate.top_p", "less than or equal to 1"]),
    (["generate.max_new_tokens=0"], ["generate.max_new_tokens"]),
    (["generate.temperature=0", "generate.n=4"], ["'generate'", "n is 4 with temperature 0", "set n: 1"]),
    (["generate.temperature=0", "generate.top_p=0.9"], ["'generate'", "top_p is set with temperature 0"]),
    (["generate.temperature=0", "generate.seed=1"], ["'generate'", "seed is set with temperature 0"]),
    (["generate.metric=f1"], ["'generate'", "metric is set with accept: all"]),
    (["generate.accept=sometimes"], ["generate.accept"]),
    (["generate.metric=bleu", "generate.accept=reference"], ["generate.metric"]),
    (["generate.max_repeat_fraction=null", "generate.repeat_ngram=3"], ["repeat_ngram is set with max_repeat_fraction: null"]),
    (["generate.sources=[{path: p.jsonl, format: text}]"], ["sources.0", "format `text`"]),
    (["generate.sources=[{path: p.jsonl, format: prompts, weight: 3}]"], ["sources.0.weight", "data.sources entry that reads generated.jsonl"]),
    (["generate.sources=[{path: a/p.jsonl, format: prompts}, {path: b/p.jsonl, format: chat}]"], ["names must be unique"]),
    (["data.sources=[{path: p.jsonl, format: prompts}]"], ["data.sources", "format `prompts`", "run `distillery generate CONFIG` first"]),
])
def test_bad_settings_fail_naming_the_key(overrides, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    for w in words:
        assert w in str(e.value)


def test_defaults_and_resolved_config_round_trip(tmp_path):
    from distillery.config import write_resolved

    cfg = load_config(None, ["output_dir=out", SRC, "generate.accept=reference", "generate.metric=f1", "generate.min_score=0.5"])
    assert cfg.generated_dir == "out/generated" and cfg.generate.n == 1 and cfg.generate.top_k is None
    assert load_config(write_resolved(cfg, tmp_path)) == cfg  # every default spelled out still validates
    assert load_config(None, ["generate.output=/x/gen"]).generated_dir == "/x/gen"
    assert set(cfg.generate.model_fields["metric"].annotation.__args__) == set(METRICS)


def test_the_teacher_that_answers():
    with pytest.raises(ConfigError, match=r"generate.teacher: not set, and model has no teacher"):
        load_config(None, [SRC]).generation_teacher()
    several = load_config(None, [SRC, "model.teachers=[{path: a}, {path: b, weight: 2}]"])
    with pytest.raises(ConfigError, match=r"generate.teacher: model.teachers names 2 teachers"):
        several.generation_teacher()
    assert load_config(None, [SRC, "model.teachers=[{path: a}, {path: b}]", "generate.teacher=c"]).generation_teacher() == ("c", "generate.teacher")
    assert load_config(None, [SRC, "model.teachers=[{path: a}]"]).generation_teacher() == ("a", "model.teachers.0.path")
    assert load_config(None, [SRC, "model.teacher=t"]).generation_teacher() == ("t", "model.teacher")


def _config_file(tmp_path, text: str):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_cli_fails_before_ray_naming_the_input(tmp_path, capsys, tiny_teacher):
    import ray

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    missing = _config_file(tmp_path, f"generate: {{sources: [{{path: {tmp_path}/none.jsonl, format: prompts}}]}}\nmodel: {{teacher: {tiny_teacher}}}\n")
    assert main(["generate", str(missing)]) == EXIT_CONFIG
    assert "generate.sources.0.path" in capsys.readouterr().err
    no_teacher = _config_file(tmp_path, f"generate: {{sources: [{{path: {prompts}, format: prompts}}]}}\n")
    assert main(["generate", str(no_teacher)]) == EXIT_CONFIG
    assert "generate.teacher: not set" in capsys.readouterr().err
    gone = _config_file(tmp_path, f"generate: {{sources: [{{path: {prompts}, format: prompts}}], teacher: {tmp_path}/gone}}\n")
    assert main(["generate", str(gone)]) == EXIT_CONFIG
    assert "generate.teacher" in capsys.readouterr().err
    prepare = _config_file(tmp_path, f"data: {{sources: [{{path: {prompts}, format: prompts}}]}}\nmodel: {{path: {tiny_teacher}}}\n")
    assert main(["prepare", str(prepare)]) == EXIT_CONFIG
    assert "run `distillery generate CONFIG` first" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_checks_that_need_the_models(tmp_path, tiny_teacher):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    base = [f"generate.sources=[{{path: {prompts}, format: prompts}}]", f"model.teacher={tiny_teacher}", f"output_dir={tmp_path}/run"]
    with pytest.raises(ConfigError, match=r"set model.path \(or model.tokenizer\)"):
        validate_generate(load_config(None, base))
    base.append(f"model.path={tiny_teacher}")
    cfg = load_config(None, base)
    ctx = validate_generate(cfg)
    assert ctx.top_k == cfg.distill.top_k and ctx.vocab == 512 and ctx.engine_dtype == "float32" and ctx.seed == 0
    assert ctx.max_model_len == 512 + 256 and ctx.sampling["seed"] == 0
    with pytest.raises(ConfigError, match=r"generate.top_k: 600 is above the vocabulary .* \(512\)"):
        validate_generate(load_config(None, base + ["generate.top_k=600"]))
    with pytest.raises(ConfigError, match=r"distill.top_k: 1000 is above"):
        validate_generate(load_config(None, base + ["distill.top_k=1000"]))
    with pytest.raises(ConfigError, match=r"data.max_length: 1024 leaves no room .* 1024 tokens"):
        validate_generate(load_config(None, base + ["data.max_length=1024"]))
    with pytest.raises(ConfigError, match=r"generate.output: .* is output_dir itself"):
        validate_generate(load_config(None, base + [f"generate.output={tmp_path}/run"]))
    with pytest.raises(ConfigError, match=r"generate.output: .* overlaps data.prepared"):
        validate_generate(load_config(None, base + [f"generate.output={tmp_path}/run/data/gen"]))


def test_repetition_filter():
    assert repeat_fraction("the cat sat on the mat and looked at the dog", 4) == 0.0
    loop = "I think so. " * 12
    assert repeat_fraction(loop, 4) > 0.85
    assert repeat_fraction("答案是四十二。" * 10, 4) > 0.8  # CJK characters count as words
    assert repeat_fraction("答案是四十二。", 4) == 0.0
    assert repeat_fraction("yes yes", 4) == 0.0  # too short to repeat anything
    # "a b a b a b": 2-grams ab ba ab ba ab -> 2 distinct of 5
    assert repeat_fraction("a b a b a b", 2) == pytest.approx(1 - 2 / 5)


def test_prompt_rows_of_each_format():
    p = validate_prompt({"prompt": "Add 1 and 2.", "reference": "3", "task": "math", "metric": "exact_match", "metadata": {"k": 1}}, "prompts")
    assert p["messages"] == [{"role": "user", "content": "Add 1 and 2."}] and p["reference"] == "3"
    assert (p["task"], p["metric"], p["metadata"]) == ("math", "exact_match", {"k": 1})
    i = validate_prompt({"instruction": "Sort", "input": "3, 1", "output": "1, 3"}, "instruction")
    assert i["reference"] == "1, 3" and i["metric"] is None
    assert validate_prompt({"instruction": "Sort"}, "instruction")["reference"] is None
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    c = validate_prompt({"messages": conv + [{"role": "assistant", "content": "Hello"}]}, "chat")
    assert c["messages"] == conv and c["reference"] == "Hello"
    assert validate_prompt({"messages": conv, "reference": "Hello"}, "chat")["reference"] == "Hello"
    for row, fmt, detail in [
        ({"reference": "x"}, "prompts", "prompt"),
        ({"prompt": 3}, "prompts", "prompt is int"),
        ({"prompt": "a", "metric": "bleu"}, "prompts", "metric 'bleu'"),
        ({"instruction": "a", "output": "b", "reference": "c"}, "instruction", "both output and reference"),
        ({"messages": [{"role": "system", "content": "s"}]}, "chat", "end with the user turn"),
        ({"messages": [{"role": "assistant", "content": "a"}]}, "chat", "end with the user turn"),
    ]:
        with pytest.raises(Invalid, match=detail):
            validate_prompt(row, fmt)


def test_instruction_prompts_render_as_prepare_renders_the_answered_row():
    """Normalised as prepare normalises an instruction row (each field, then joined), so the prompt
    the teacher answers is the prompt of the row prepare later reads."""
    row = {"instruction": "Sort  these\n\n\n", "input": " 3,\u00a01 ", "output": "1, 3"}
    fields = validate_prompt(row, "instruction")
    expected = to_messages(normalize_fields(validate(row, "instruction"), "instruction"), "instruction")[:-1]
    assert prompt_messages(fields, "instruction") == expected == [{"role": "user", "content": "Sort these\n3, 1"}]
    with pytest.raises(Invalid, match="instruction"):
        prompt_messages(validate_prompt({"instruction": " \n "}, "instruction"), "instruction")


def test_sequence_keys_and_sample_seeds_are_stable():
    assert sequence_key([1, 2, 3]) == sequence_key((1, 2, 3)) == sequence_key(json.loads("[1, 2, 3]"))
    assert sequence_key([1, 2, 3]) != sequence_key([1, 2, 3, 0]) and len(sequence_key([1])) == 32
    seeds = {sample_seed(0, "p", i) for i in range(8)} | {sample_seed(1, "p", 0), sample_seed(0, "q", 0)}
    assert len(seeds) == 10 and all(0 <= s < 2**31 for s in seeds)
    assert sample_seed(0, "p", 3) == sample_seed(0, "p", 3)


def test_engine_settings_reach_the_engine(tmp_path, tiny_teacher):
    """generate.engine: its dtype and context replace the defaults in the engine's arguments; a
    context with no room for an answer and GPU keys on a CPU run fail before Ray starts."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    base = [f"generate.sources=[{{path: {prompts}, format: prompts}}]", f"model.teacher={tiny_teacher}", f"model.path={tiny_teacher}",
            f"output_dir={tmp_path}/run", "data.max_length=64"]
    ctx = validate_generate(load_config(None, base + ["generate.engine.dtype=bfloat16", "generate.engine.max_model_len=100"]))
    assert ctx.engine == {"dtype": "bfloat16", "enforce_eager": True, "max_model_len": 100} and ctx.max_model_len == 100
    assert ctx.engine_dtype == "bfloat16" and ctx.resources == {}
    with pytest.raises(ConfigError, match=r"generate.engine.max_model_len: 64 leaves no room"):
        validate_generate(load_config(None, base + ["generate.engine.max_model_len=64"]))
    with pytest.raises(ConfigError, match=r"generate.engine.tensor_parallel_size is a GPU setting"):
        validate_generate(load_config(None, base + ["generate.engine.tensor_parallel_size=2"]))
