"""Real instruction data, offline: questions about Python's standard library answered by its own
docstrings (``inspect.getdoc``), for distilling a real chat model.

Each public function or class of a fixed list of stdlib modules with a docstring of at least
``min_chars`` characters gives one pair, "What does ``module.name`` do?" -> the docstring's first
paragraphs (up to ``max_chars``). The held-out split is chosen by a hash of the qualified name,
so it is the same on every run and never trained on. The docstrings are those of the running
interpreter (the numbers in a report hold for its Python version). A pair is rendered in a chat
model's template (:func:`encode`) and scored by its answer's NLL per UTF-8 byte
(:func:`heldout_nll`), comparable across tokenizers.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
from typing import Any

import torch
import torch.nn.functional as F

from axolotl_dskd.core.loss import IGNORE_INDEX
from dskd_devkit.training import pad_batch

_MODULE_NAMES = (
    "abc argparse array ast asyncio base64 bisect binascii calendar cmath codecs collections "
    "colorsys contextlib copy csv dataclasses datetime decimal difflib dis email.utils enum "
    "filecmp fnmatch fractions functools gc getopt glob gzip hashlib heapq hmac html html.parser "
    "http.client imaplib inspect io ipaddress itertools json keyword linecache locale logging "
    "lzma math mimetypes operator os os.path pathlib pickle pkgutil platform plistlib pprint "
    "queue quopri random re reprlib sched secrets select selectors shelve shlex shutil signal "
    "smtplib socket sqlite3 stat statistics string struct subprocess sys tarfile tempfile "
    "textwrap threading time timeit tokenize traceback types typing unicodedata urllib.parse "
    "urllib.request uuid warnings weakref xml.etree.ElementTree zipfile zlib"
)
MODULES = tuple(_MODULE_NAMES.split(" "))
QUESTIONS = (
    "What does `{name}` do in Python?",
    "Explain `{name}` from Python's standard library.",
    "How do I use `{name}`?",
    "Describe the Python function or class `{name}`.",
)


def _answer(doc: str, max_chars: int) -> str:
    """Whole paragraphs of ``doc`` while they fit in ``max_chars`` (at least the first, cut)."""
    kept: list[str] = []
    for paragraph in doc.split("\n\n"):
        if kept and len("\n\n".join([*kept, paragraph])) > max_chars:
            break
        kept.append(paragraph)
    return "\n\n".join(kept)[:max_chars].rstrip()


def stdlib_pairs(min_chars: int = 80, max_chars: int = 400) -> list[dict[str, str]]:
    """Every ``{"name", "question", "answer"}`` pair, in a fixed order."""
    pairs, seen = [], set()
    for module_name in MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for attr in sorted(dir(module)):
            if attr.startswith("_"):
                continue
            obj = getattr(module, attr)
            if not (inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.isclass(obj)):
                continue
            doc = inspect.getdoc(obj)
            if not doc or len(doc) < min_chars or id(obj) in seen:
                continue
            seen.add(id(obj))
            name = f"{module_name}.{attr}"
            digest = int(hashlib.sha256(name.encode()).hexdigest(), 16)
            question = QUESTIONS[digest % len(QUESTIONS)].format(name=name)
            pairs.append({"name": name, "question": question, "answer": _answer(doc, max_chars)})
    return pairs


def split(pairs: list[dict[str, str]], heldout_percent: int = 10) -> tuple[list, list]:
    """``(train, heldout)`` by a hash of each pair's name."""
    train, heldout = [], []
    for pair in pairs:
        digest = int(hashlib.sha256(("split:" + pair["name"]).encode()).hexdigest(), 16)
        (heldout if digest % 100 < heldout_percent else train).append(pair)
    return train, heldout


def chat_prompt(tokenizer: Any, pair: dict[str, str]) -> str:
    """The question in the model's chat template, up to where the answer starts."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": pair["question"]}], add_generation_prompt=True, tokenize=False
    )


def encode(tokenizer: Any, pair: dict[str, str], max_len: int) -> tuple[list[int], list[int], int]:
    """``(input_ids, labels, answer_bytes)``: the chat-rendered question, the answer and
    ``<|im_end|>`` trained; ``answer_bytes`` counts the UTF-8 bytes of the trained tokens kept."""
    prompt = tokenizer(chat_prompt(tokenizer, pair), add_special_tokens=False)["input_ids"]
    answer = tokenizer(pair["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (prompt + answer)[:max_len]
    labels = ([IGNORE_INDEX] * len(prompt) + answer)[:max_len]
    kept = [t for t in labels if t != IGNORE_INDEX and t != tokenizer.eos_token_id]
    return ids, labels, len(tokenizer.decode(kept).encode())


def heldout_nll(model: Any, examples: list, pad_id: int, batch_size: int = 16) -> dict[str, float]:
    """The answers' NLL per token and per UTF-8 byte under ``model`` (the bytes of the
    :func:`encode`-d answers kept)."""
    nll, tokens, nbytes = 0.0, 0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            idx = list(range(start, min(start + batch_size, len(examples))))
            batch = pad_batch([examples[i][:2] for i in idx], pad_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            targets = batch["labels"][:, 1:]
            nll += F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, reduction="sum").item()
            tokens += int((targets != IGNORE_INDEX).sum())
            nbytes += sum(examples[i][2] for i in idx)
    model.train(was_training)
    return {"nll_token": nll / tokens, "nll_byte": nll / nbytes}
