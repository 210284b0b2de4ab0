"""What the docs say about trainer pass-through and export targets matches the code."""

import re
from pathlib import Path

from finetune.trainer_config import FIXED, OUR_FIELDS, OVERRIDABLE

ROOT = Path(__file__).resolve().parents[2]


def test_configs_doc_lists_every_field_we_set_and_fix():
    doc = (ROOT / "docs" / "configs.md").read_text()
    for field, ours in OUR_FIELDS.items():
        assert re.search(rf"\| `{re.escape(ours)}` \|[^\n]*`{field}`", doc), field
    for field in FIXED:
        assert f"| `{field}` |" in doc, field
    for field in OVERRIDABLE:
        assert f"`{field}`" in doc, field


def test_vllm_is_named_nowhere_as_an_export_target():
    """vLLM cannot be installed beside this stack (docs/export.md says why), so no export table lists it and no
    extra pretends to install it."""
    for path in (ROOT / "README.md", ROOT / "docs" / "export.md"):
        rows = [line for line in path.read_text().splitlines() if line.startswith("|")]
        assert not [row for row in rows if "vllm" in row.lower()], path
    assert "vLLM is not a target" in (ROOT / "docs" / "export.md").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()  # (tomllib is 3.11+; the project supports 3.10)
    assert "vllm" not in pyproject.lower()
    assert re.search(r'^trackers = \["wandb', pyproject, re.M)
    extras = re.search(r"pip install -q -e '\.\[([\w,]+)\]'", (ROOT / "Makefile").read_text()).group(1).split(",")
    assert "trackers" in extras  # make test runs the W&B test
