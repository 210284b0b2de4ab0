"""``finetune push``: a run or an export to a model repository, through ``huggingface_hub``'s ``HfApi``.

    finetune push runs/sft --repo_id me/tiny-sft                       # the adapter run
    finetune push exports/sft-merged --repo_id me/tiny-sft-merged --private
    finetune push exports/sft-gguf --repo_id me/tiny-sft-gguf --to_dir /tmp/hub   # a local stand-in, no network

What goes up is the directory's model files, tokenizer, generation config, ``config.yaml``, ``summary.json``,
``metrics.jsonl``, ``loss.png`` and export metadata, with its model card ``README.md`` (:mod:`finetune.model_card`;
written first if the directory has none or only PEFT's default). Checkpoints, TensorBoard events, rejected records and
hidden staging directories stay behind (:data:`IGNORE_PATTERNS`). Two calls do it, ``create_repo(exist_ok=True)``
and ``upload_folder`` with those patterns, on any object with ``HfApi``'s two methods: :class:`LocalHub` is one that
writes into a local directory, for tests and for looking at what would be uploaded.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

IGNORE_PATTERNS = ["checkpoint-*", "runs/*", "rejects.jsonl", "training_args.bin", ".*", "*/.*", "*/README.md"]
"""What stays behind: checkpoints (resumable state, not a model), TensorBoard events, rejected records, the pickled
trainer arguments, hidden staging directories, and READMEs below the top level (PEFT's defaults in sub-adapters)."""


class PushError(ValueError):
    """Not something to push (no weights), or a bad repository id: one line, exit status 2."""


class LocalHub:
    """A stand-in for ``huggingface_hub.HfApi``: ``create_repo`` and ``upload_folder`` into ``root/REPO_ID``.

    It picks files with ``huggingface_hub.utils.filter_repo_objects``, the filter ``HfApi.upload_folder`` applies to
    ``allow_patterns``/``ignore_patterns``, plus the hub's own default ignores (``.git``, ``.cache/huggingface``), so
    what lands here is what would be uploaded.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def create_repo(self, repo_id: str, *, private: bool | None = None, exist_ok: bool = False, repo_type=None, **_):
        path = self.root / repo_id
        if path.exists() and not exist_ok:
            raise PushError(f"{repo_id} already exists in {self.root}")
        path.mkdir(parents=True, exist_ok=True)
        return str(path)

    def upload_folder(self, *, repo_id: str, folder_path, allow_patterns=None, ignore_patterns=None, **_):
        folder = Path(folder_path)
        target = self.root / repo_id
        for name in _selected(folder, allow_patterns, ignore_patterns):
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(folder / name, target / name)
        return str(target)


def _selected(folder: Path, allow_patterns, ignore_patterns) -> list[str]:
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

    names = [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*")) if p.is_file()]
    ignore = list(ignore_patterns or []) + list(DEFAULT_IGNORE_PATTERNS)
    return list(filter_repo_objects(names, allow_patterns=allow_patterns, ignore_patterns=ignore))


def files_to_push(directory: str | Path) -> list[str]:
    """The relative paths :func:`push` uploads from ``directory`` (what :class:`LocalHub` would copy)."""
    return _selected(Path(directory), None, IGNORE_PATTERNS)


def push(directory: str | Path, repo_id: str, api=None, private: bool = False, commit_message: str | None = None):
    """Upload a finished run or an export to ``repo_id`` through ``api`` (default ``huggingface_hub.HfApi()``);
    returns what ``upload_folder`` returned.

    Raises:
        PushError: ``directory`` holds no model, adapter or GGUF, is an unfinished run, or ``repo_id`` is not
            ``owner/name``.
    """
    from .model_card import CARD_FILE, PEFT_DEFAULT_CARD_MARK, is_hub_id, write_model_card
    from .run_dir import RunDir, is_export_directory

    path = Path(directory)
    if not path.is_dir():
        raise PushError(f"{directory} is not a directory; pass a run (runs/sft) or an export (exports/sft-merged)")
    if not is_hub_id(repo_id):
        raise PushError(f"--repo_id {repo_id!r} is not a hub repository id (owner/name)")
    run = RunDir.read(path)
    if not run.finished:
        raise PushError(f"{directory}: that run did not finish; resume it with --resume, then push")
    if run.kind is None and not (is_export_directory(path) and any(path.glob("*.gguf"))):
        raise PushError(f"{directory} holds no adapter, model or GGUF to push")
    card = path / CARD_FILE
    if not card.is_file() or PEFT_DEFAULT_CARD_MARK in card.read_text():
        write_model_card(path)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=str(path),
        repo_type="model",
        ignore_patterns=list(IGNORE_PATTERNS),  # a copy: upload_folder appends its defaults to the list it is given
        commit_message=commit_message or f"finetune push {path.name}",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``finetune push``'s arguments."""
    parser.add_argument("directory", help="a finished run (runs/sft) or an export (exports/sft-merged, -gguf, ...)")
    parser.add_argument("--repo_id", required=True, help="the model repository, owner/name (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--to_dir", default=None,
                        help="write into TO_DIR/REPO_ID instead of the hub (what would be uploaded; no network)")
    parser.add_argument("--message", default=None, help="the commit message")


def run(args: argparse.Namespace) -> int:
    """Run ``finetune push``; a user error prints ``error: ...`` and returns 2."""
    api = LocalHub(args.to_dir) if args.to_dir else None
    try:
        where = push(args.directory, args.repo_id, api, args.private, args.message)
    except PushError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    files = files_to_push(args.directory)
    print(f"pushed {args.directory} to {args.repo_id} ({len(files)} files: {', '.join(files)}): {where}")
    return 0
