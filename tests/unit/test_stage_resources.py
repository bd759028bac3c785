"""The Ray resources each stage requests for a GPU config, and the vLLM settings its engines get,
checked without a GPU: a wrong request here is a job that lands its engine on a CPU node."""

from __future__ import annotations

import pytest

from distillery.config import ConfigError, validate_tree
from distillery.distill.teacher_cache import cache_actor_resources
from distillery.engine_settings import check_engine, engine_kwargs, engine_resources
from distillery.evaluation.worker import eval_max_model_len, eval_task_resources
from distillery.serving.app import check_serve_engine
from distillery.train.run import worker_resources

ENGINE = {"tensor_parallel_size": 2, "gpu_memory_utilization": 0.8, "accelerator_type": "H100"}


def gpu_config(**extra):
    tree = {
        "train": {"use_gpu": True, "cpus_per_worker": 4, "worker_resources": {"accelerator_type:H100": 0.001}},
        "model": {"dtype": "auto"},
        "eval": {"engine": ENGINE},
        "generate": {"engine": {**ENGINE, "max_model_len": 4096}},
        "distill": {"cache_engine": {"tensor_parallel_size": 4}},
    }
    tree.update(extra)
    return validate_tree(tree, "test")


def test_each_stage_requests_its_gpus():
    cfg = gpu_config()
    # Training workers: one GPU each, their CPU share, and the node pinning the user asked for.
    assert worker_resources(cfg) == {"CPU": 4, "GPU": 1, "accelerator_type:H100": 0.001}
    # Eval runs each model in a task holding the engine's GPUs, on the named accelerator.
    assert eval_task_resources(cfg, local=False) == {"num_cpus": 1, "num_gpus": 2, "accelerator_type": "H100"}
    # Teacher cache: vLLM actors hold tensor_parallel_size GPUs; the HF forward one.
    assert cache_actor_resources(cfg, "vllm") == {"num_cpus": 1, "num_gpus": 4}
    assert cache_actor_resources(cfg, "hf") == {"num_cpus": 1, "num_gpus": 1}
    # Generation actors (GenerateContext.resources is engine_resources of generate.engine).
    assert engine_resources(cfg.generate.engine, True) == {"num_gpus": 2, "accelerator_type": "H100"}
    # Serve engines: test_serving_plan.py (test_llm_config_on_gpus).


def test_cpu_config_requests_no_gpus():
    cfg = validate_tree({"train": {"cpus_per_worker": 2}}, "test")
    assert worker_resources(cfg) == {"CPU": 2}
    assert eval_task_resources(cfg, local=False) == {"num_cpus": 1}
    assert cache_actor_resources(cfg, "hf") == {"num_cpus": 1}
    assert engine_resources(cfg.generate.engine, False) == {}


def test_engine_kwargs_follow_the_hardware():
    cfg = gpu_config()
    gpu = engine_kwargs(cfg.eval.engine, cfg.model.dtype, True, 512)
    assert gpu == {"dtype": "bfloat16", "enforce_eager": False, "max_model_len": 512, "gpu_memory_utilization": 0.8,
                   "tensor_parallel_size": 2, "distributed_executor_backend": "mp"}
    # The engine's own max_model_len wins over the stage's need.
    assert engine_kwargs(cfg.generate.engine, "auto", True, 512)["max_model_len"] == 4096
    cpu = engine_kwargs(validate_tree({}, "t").eval.engine, "auto", False, 300)
    assert cpu == {"dtype": "float32", "enforce_eager": True, "max_model_len": 300}
    # engine.dtype wins over model.dtype.
    cfg2 = validate_tree({"eval": {"engine": {"dtype": "float16"}}, "model": {"dtype": "bfloat16"}}, "t")
    assert engine_kwargs(cfg2.eval.engine, cfg2.model.dtype, False, None)["dtype"] == "float16"
    assert engine_kwargs(validate_tree({}, "t").eval.engine, "bfloat16", False, None)["dtype"] == "bfloat16"


@pytest.mark.parametrize("key, value", [("tensor_parallel_size", 2), ("gpu_memory_utilization", 0.5), ("accelerator_type", "A10G")])
def test_gpu_settings_on_cpu_are_refused(key, value):
    cfg = validate_tree({"eval": {"engine": {key: value}}}, "t")
    with pytest.raises(ConfigError, match=rf"eval\.engine\.{key} is a GPU setting"):
        check_engine(cfg.eval.engine, "eval.engine", cfg.train.use_gpu)
    serve = validate_tree({"serve": {key: value, "device": "cpu"}}, "t")
    with pytest.raises(ConfigError, match=rf"serve\.{key} is a GPU setting.*serve\.device: cpu"):
        check_serve_engine(serve, use_gpu=False)


def test_eval_context_is_what_the_prompts_need():
    assert eval_max_model_len(100, 32, 2048) == 140
    assert eval_max_model_len(4000, 256, 2048) == 2048
    assert eval_max_model_len(10, 5, None) == 23
