"""Chat pairs on real tokenizers and templates, for the teacher's-own-template tests.

Tiny random-weight models carry the real Qwen3 and Llama 3 tokenizers (npm, see
:mod:`dskd_devkit.real_tokenizers`) with their own chat templates; :data:`CONVERSATIONS` is a
``chat_template`` dataset that exercises them (a system prompt, several turns, accents, CJK,
emoji, code, contents with surrounding whitespace). :func:`chat_config` is an Axolotl config for
a pair, with each student's end-of-turn settings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dskd_devkit.axolotl_runs import CPU_LORA_BASE
from dskd_devkit.real_tokenizers import real_tokenizer_dir

CONVERSATIONS: list[list[dict[str, str]]] = [
    [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "What is 12 + 30?"},
        {"role": "assistant", "content": "12 + 30 = 42."},
        {"role": "user", "content": "Et en français, s'il te plaît ? 谢谢"},
        {"role": "assistant", "content": "Quarante-deux. 😀 不客气！"},
    ],
    [
        {"role": "user", "content": "Write a Python function that doubles x."},
        {"role": "assistant", "content": "def double(x):\n    return 2 * x\n"},
    ],
    [
        {"role": "user", "content": "  Say hi.  "},
        {"role": "assistant", "content": "\nHi!\n\n"},
    ],
]
TOOL_CONVERSATION = [
    {"role": "user", "content": "What time is it?"},
    {"role": "tool", "content": "12:00"},
    {"role": "assistant", "content": "It is noon."},
]
"""A tool turn: templates of the Mistral family reject the role."""

STUDENT_KEYS: dict[str, dict[str, Any]] = {
    # Llama 3's EOS (<|end_of_text|>) is not in its chat template: its turns end with <|eot_id|>
    "llama3": {"eot_tokens": ["<|eot_id|>"], "special_tokens": {"pad_token": "<|end_of_text|>"}},
    "qwen3": {},
}
DATASET_KEYS: dict[str, dict[str, Any]] = {"llama3": {"train_on_eot": "turn"}, "qwen3": {}}
END_OF_TURN = {"llama3": "<|eot_id|>", "qwen3": "<|im_end|>", "llama2": "</s>"}
FAMILY = {"llama3": "llama", "qwen3": "qwen2", "llama2": "llama"}


def write_conversations(path: Path, conversations: list[list[dict[str, str]]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in conversations))
    return path


def chat_model(name: str, directory: Path, *, weights: bool = False, hidden_size: int = 64) -> Path:
    """A tiny model folder on the real tokenizer ``name``: its config and tokenizer, and random
    weights if ``weights`` (dataset preparation and config validation read no weights)."""
    from transformers import AutoTokenizer

    from dskd_devkit.training import tiny_model

    tokenizer = AutoTokenizer.from_pretrained(real_tokenizer_dir(name))
    model = tiny_model(
        FAMILY[name], tokenizer, hidden_size=hidden_size, num_layers=1, max_position_embeddings=1024
    )
    directory.mkdir(parents=True, exist_ok=True)
    if weights:
        model.save_pretrained(directory)
    else:
        model.config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def chat_dataset(student: str, data: Path) -> dict[str, Any]:
    """The ``datasets:`` entry of a ``chat_template`` file for the student ``student``."""
    return {
        "path": str(data),
        "ds_type": "json",
        "type": "chat_template",
        "field_messages": "messages",
        **DATASET_KEYS[student],
    }


def chat_config(
    student: str, student_dir: Path, teacher_dir: Path, data: Path, out: Path, **overrides: Any
) -> dict[str, Any]:
    """An Axolotl config distilling ``teacher_dir`` into a LoRA on ``student_dir`` (real tokenizer
    ``student``) on the ``chat_template`` dataset ``data``."""
    cfg = {
        **CPU_LORA_BASE,
        "plugins": ["axolotl_dskd.DSKDPlugin"],
        "base_model": str(student_dir),
        "dskd_teacher": str(teacher_dir),
        "datasets": [chat_dataset(student, data)],
        "sequence_len": 512,
        "dataset_num_proc": 1,
        "output_dir": str(out / "output"),
        "dataset_prepared_path": str(out / "prepared"),
        **STUDENT_KEYS[student],
        **overrides,
    }
    return {k: v for k, v in cfg.items() if v is not None}
