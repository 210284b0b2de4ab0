"""The documents of the bundled ``finetune_suite`` lm-eval task (``finetune_suite.yaml``): the suite's eval split.

lm-eval calls :func:`load` for the task's ``custom_dataset`` with the task's metadata as keyword arguments.
"""

from __future__ import annotations


def load(**_) -> dict:
    """``{"test": Dataset}`` of ``{"prompt", "answer", "wrong"}`` from the shipped suite preference eval file."""
    import json

    from datasets import Dataset

    from finetune.suite import sample_path

    docs = []
    for line in sample_path("preference", "eval").read_text().splitlines():
        record = json.loads(line)
        docs.append({"prompt": record["prompt"][0]["content"], "answer": record["chosen"][0]["content"],
                     "wrong": record["rejected"][0]["content"]})
    return {"test": Dataset.from_list(docs)}
