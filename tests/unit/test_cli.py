"""The CLI in-process: config printing, --explain, error exits, pending stages."""

from __future__ import annotations

import yaml

from distillery.cli import EXIT_CONFIG, main


def test_config_prints_resolved_yaml(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text("method: {kind: lora}\n")
    assert main(["config", str(p), "method.lora.r=32", "train.lr=1e-5"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["method"]["lora"]["r"] == 32 and out["train"]["lr"] == 1e-5


def test_explain_lists_keys_with_docs(capsys):
    assert main(["config", "--explain"]) == 0
    out = capsys.readouterr().out
    assert "distill.temperature" in out and "T²" in out
    assert "train.max_failures" in out and "default: 0" in out


def test_bad_key_exits_2_naming_key_and_file(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text("train: {lr: 1e-4}\n")
    assert main(["finetune", str(p), "train.lrr=1"]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "train.lrr" in err and str(p) in err


def test_missing_input_exits_2_before_any_work(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text(f"data:\n  sources: [{{path: {tmp_path}/none.jsonl}}]\n")
    assert main(["prepare", str(p)]) == EXIT_CONFIG
    assert "data.sources.0.path" in capsys.readouterr().err


def test_esft_on_a_dense_model_exits_2_before_ray(tmp_path, capsys, prepared_tiny, tiny_student):
    """`method.kind: esft` on a dense student is refused by `distillery finetune` with exit 2 and Ray never starts."""
    import ray

    p = tmp_path / "c.yaml"
    p.write_text(f"data: {{prepared: {prepared_tiny}}}\nmodel: {{path: {tiny_student}}}\nmethod: {{kind: esft}}\n"
                 f"output_dir: {tmp_path}/run\n")
    assert main(["finetune", str(p)]) == EXIT_CONFIG
    assert "method.kind: esft trains chosen experts of a mixture-of-experts model" in capsys.readouterr().err
    assert not ray.is_initialized()
    assert not (tmp_path / "run").exists()


def test_init_model_flag_errors(tmp_path, capsys, tiny_teacher):
    assert main(["init-model", str(tmp_path / "m"), "--hidden", "30", "--heads", "4", "--tokenizer-from", str(tiny_teacher)]) == EXIT_CONFIG
    assert "divisible" in capsys.readouterr().err
    spec = tmp_path / "spec.yaml"
    spec.write_text("arch: llama\nlayerz: 2\n")
    assert main(["init-model", str(tmp_path / "m"), "--spec", str(spec), "--tokenizer-from", str(tiny_teacher)]) == EXIT_CONFIG
    assert "layerz" in capsys.readouterr().err
