"""Inspecting and loading the frozen teacher (transformers, PEFT and bitsandbytes only).

:func:`inspect_teacher` reads only configs and tokenizers, so every mistake it can find is
reported before a single weight is loaded; :func:`load_teacher` then loads the weights, or
:func:`load_teacher_head` only the LM head and embeddings (training from a teacher cache).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import struct
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from axolotl_dskd.core.models import logit_scale
from axolotl_dskd.core.vocabulary import PROBE_TEXT, encodes_text

LOG = logging.getLogger(__name__)


class TeacherConfigError(ValueError):
    """A teacher setting that cannot work; the message names the YAML key."""


@dataclass(frozen=True)
class TeacherInfo:
    config: PretrainedConfig
    tokenizer: PreTrainedTokenizerBase
    hidden_size: int
    max_length: int | None
    same_vocabulary: bool


def same_vocabulary(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    """Equal token-to-id maps: equal sizes with different tokens is a different vocabulary."""
    return a.get_vocab() == b.get_vocab()


def context_length(config: PretrainedConfig) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _refuse_custom_code(exc: Exception, source: str, trust_remote_code: bool) -> None:
    """transformers refuses a model whose config or tokenizer needs its own Python code (an
    ``auto_map`` to a module in the repository) unless trusted; say which YAML key trusts it."""
    if not trust_remote_code and "trust_remote_code" in str(exc):
        raise TeacherConfigError(
            f"dskd_teacher_trust_remote_code: {source!r} needs its own Python code to load (its "
            "config's auto_map names a module in the repository), which the plugin does not run "
            "by default. Read that code, then set dskd_teacher_trust_remote_code: true if you "
            "trust it, or choose a teacher that transformers supports natively."
        ) from exc


def inspect_teacher(
    teacher: str,
    *,
    tokenizer: str | None,
    student_tokenizer: PreTrainedTokenizerBase,
    trust_remote_code: bool = False,
) -> TeacherInfo:
    """Read the teacher's config and tokenizer; raise naming the key if either is unusable."""
    try:
        config = AutoConfig.from_pretrained(teacher, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        _refuse_custom_code(exc, teacher, trust_remote_code)
        raise TeacherConfigError(
            f"dskd_teacher: cannot read a model config from {teacher!r} ({exc}). "
            "Set dskd_teacher to a local model folder or a Hugging Face hub id you can access."
        ) from exc
    text_config = config.get_text_config()
    try:
        logit_scale(text_config, "teacher")
    except ValueError as exc:
        raise TeacherConfigError(f"dskd_teacher: {exc}") from exc
    source = tokenizer or teacher
    try:
        teacher_tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        _refuse_custom_code(exc, source, trust_remote_code)
        key = "dskd_teacher_tokenizer" if tokenizer else "dskd_teacher"
        raise TeacherConfigError(
            f"{key}: cannot load a tokenizer from {source!r} ({exc}). "
            "Set dskd_teacher_tokenizer to the teacher's tokenizer folder or hub id."
        ) from exc
    if not encodes_text(teacher_tokenizer):
        key = "dskd_teacher_tokenizer" if tokenizer else "dskd_teacher"
        raise TeacherConfigError(
            f"{key}: cannot load a tokenizer from {source!r} (what loads turns {PROBE_TEXT!r} into "
            "no tokens: the folder holds no tokenizer files). Set dskd_teacher_tokenizer to the "
            "teacher's tokenizer folder or hub id."
        )
    return TeacherInfo(
        config=config,
        tokenizer=teacher_tokenizer,
        hidden_size=text_config.hidden_size,
        max_length=context_length(text_config),
        same_vocabulary=same_vocabulary(student_tokenizer, teacher_tokenizer),
    )


WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json", "*.bin.index.json")
"""What transformers loads a model's weights from."""


def check_has_weights(teacher: str) -> None:
    """A local teacher folder holds weights, not only a config (a hub id is checked as it loads)."""
    folder = Path(teacher)
    if folder.is_dir() and not any(any(folder.glob(pattern)) for pattern in WEIGHT_FILES):
        raise TeacherConfigError(
            f"dskd_teacher: {teacher} holds a config but no model weights (no model.safetensors, "
            "sharded safetensors or pytorch_model.bin). Point dskd_teacher to the folder "
            "save_pretrained wrote the teacher to, weights included."
        )


def require_bitsandbytes(key: str) -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise TeacherConfigError(
            f"{key}: true needs bitsandbytes, which cannot be imported ({exc}). "
            f"Run `pip install bitsandbytes` or set {key}: false."
        ) from exc


def quantization_config(
    load_in_4bit: bool, load_in_8bit: bool, compute_dtype: torch.dtype
) -> BitsAndBytesConfig | None:
    """nf4 with double quantization and the training precision as compute dtype, or int8."""
    if load_in_4bit:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_teacher(
    teacher: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    adapter: str | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """The teacher, frozen, in eval mode, on ``device``, quantized as asked."""
    quantization = quantization_config(load_in_4bit, load_in_8bit, dtype)
    model = AutoModelForCausalLM.from_pretrained(
        teacher,
        dtype=dtype,
        quantization_config=quantization,
        device_map={"": device} if quantization is not None else None,
        trust_remote_code=trust_remote_code,
    )
    if quantization is None:
        model.to(device)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.eval()
    model.requires_grad_(False)
    LOG.info(
        "DSKD teacher %s loaded on %s (%s%s)",
        teacher,
        device,
        dtype,
        ", 4-bit nf4" if load_in_4bit else ", 8-bit" if load_in_8bit else "",
    )
    return model


class TeacherHead(nn.Module):
    """What DSKD reads of a teacher whose hidden states are cached: its LM head and, across
    tokenizers, its input embeddings; the transformer itself is never loaded."""

    def __init__(self, config: PretrainedConfig, lm_head: Tensor, embeddings: Tensor | None) -> None:
        super().__init__()
        self.config = config
        self.lm_head = nn.Linear(lm_head.shape[1], lm_head.shape[0], bias=False, device="meta")
        self.lm_head.weight = nn.Parameter(lm_head, requires_grad=False)
        self.embed_tokens = None if embeddings is None else nn.Embedding.from_pretrained(embeddings)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def get_input_embeddings(self) -> nn.Embedding:
        if self.embed_tokens is None:
            raise ValueError("the teacher's input embeddings were not loaded (one vocabulary)")
        return self.embed_tokens


def load_teacher_head(
    teacher: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    with_embeddings: bool,
    trust_remote_code: bool = False,
) -> TeacherHead:
    """The teacher's LM head (and input embeddings) read from its safetensors alone: only the
    files that hold them are opened, so a folder with config, tokenizer, head and embeddings is a
    complete teacher for training from its cache. Parameter names come from the architecture,
    built on the meta device (tied weights: either name)."""
    config = AutoConfig.from_pretrained(teacher, trust_remote_code=trust_remote_code)
    skeleton = _skeleton(config, trust_remote_code)
    wanted = {"lm_head": skeleton.get_output_embeddings().weight}
    if with_embeddings:
        wanted["embeddings"] = skeleton.get_input_embeddings().weight
    names = {
        role: [n for n, p in skeleton.named_parameters(remove_duplicate=False) if p is param]
        for role, param in wanted.items()
    }
    weight_map = _safetensors_weight_map(teacher)
    loaded = {}
    for role, candidates in names.items():
        found = next((n for n in candidates if n in weight_map), None)
        if found is None:
            raise TeacherConfigError(
                f"dskd_teacher: {teacher!r} has no {' or '.join(candidates)} in its safetensors; "
                "training from dskd_teacher_cache reads the teacher's LM head and embeddings from "
                "them. Point dskd_teacher to the teacher's original folder."
            )
        with safe_open(weight_map[found], framework="pt", device=str(device)) as f:
            loaded[role] = f.get_tensor(found).to(dtype)
    LOG.info(
        "DSKD teacher %s: LM head%s read from its safetensors", teacher, " and embeddings" * with_embeddings
    )
    head = TeacherHead(config, loaded["lm_head"], loaded.get("embeddings"))
    return head.eval().requires_grad_(False)


def _skeleton(config: PretrainedConfig, trust_remote_code: bool) -> PreTrainedModel:
    """The teacher's architecture on the meta device: its module names, no memory."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def adapter_changed_heads(
    adapter: str, config: PretrainedConfig, *, trust_remote_code: bool = False
) -> list[str]:
    """Names of the teacher's LM head and input embeddings that a PEFT adapter trains or
    replaces (``target_modules``, ``modules_to_save``, ``trainable_token_indices``): reading
    them from the base teacher's safetensors would miss the adapter's change."""
    from peft import PeftConfig

    peft_config = PeftConfig.from_pretrained(adapter)
    skeleton = _skeleton(config, trust_remote_code)
    heads = {skeleton.get_output_embeddings(), skeleton.get_input_embeddings()}
    targets = getattr(peft_config, "target_modules", None) or []
    saved = getattr(peft_config, "modules_to_save", None) or []
    changed = []
    for name, module in skeleton.named_modules():
        if module not in heads:
            continue
        leaf = name.rsplit(".", 1)[-1]
        targeted = (
            re.fullmatch(targets, name) is not None
            if isinstance(targets, str)
            else any(t in (name, leaf) or name.endswith(f".{t}") for t in targets)
        )
        token_indices = module is skeleton.get_input_embeddings() and getattr(
            peft_config, "trainable_token_indices", None
        )
        if targeted or leaf in saved or name in saved or token_indices:
            changed.append(name)
    return changed


_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def tensor_digests(teacher: str) -> dict[str, str]:
    """sha256 of the stored bytes (with dtype and shape) of the teacher's tensors outside its
    layers (embeddings, LM head, final norm) and of its first and last layer, by name.

    What a teacher cache's states depend on beyond the config: a new fine-tune saved over the
    same folder changes them. Cheap (the rest of the layers is not read) and independent of
    file times; a folder holding only the LM head and embeddings yields just those.
    """
    weight_map = _safetensors_weight_map(teacher)
    layer = {name: int(m.group(1)) for name in weight_map if (m := _LAYER_INDEX.search(name))}
    ends = {min(layer.values()), max(layer.values())} if layer else set()
    by_file: dict[str, list[str]] = defaultdict(list)
    for name in weight_map:
        if name not in layer or layer[name] in ends:
            by_file[weight_map[name]].append(name)
    digests = {}
    for path, names in by_file.items():
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
            for name in names:
                entry = header[name]
                digest = hashlib.sha256(json.dumps([entry["dtype"], entry["shape"]]).encode())
                start, end = entry["data_offsets"]
                f.seek(8 + size + start)
                for at in range(start, end, 1 << 24):
                    digest.update(f.read(min(1 << 24, end - at)))
                digests[name] = digest.hexdigest()
    return dict(sorted(digests.items()))


def _safetensors_weight_map(teacher: str) -> dict[str, str]:
    """Tensor name -> local safetensors file of a teacher folder or hub id (a sharded model's
    index names the shard; only the shards asked for are downloaded)."""
    from transformers.utils import cached_file

    def local(name: str) -> str | None:
        return cached_file(teacher, name, _raise_exceptions_for_missing_entries=False)

    index = local("model.safetensors.index.json")
    if index is not None:
        shards = json.loads(Path(index).read_text())["weight_map"]
        return _LazyFiles(shards, local)
    single = local("model.safetensors")
    if single is None:
        raise TeacherConfigError(
            f"dskd_teacher: {teacher!r} has no safetensors weights (model.safetensors or "
            "model.safetensors.index.json); a teacher cache is built for, and training from "
            "dskd_teacher_cache reads the LM head from, those files. Save the teacher with "
            "safe_serialization (the default)."
        )
    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}  # noqa: SIM118 - safe_open has no __iter__


class _LazyFiles(dict):
    """A sharded model's weight map whose shard files are fetched only when looked up."""

    def __init__(self, shards: dict[str, str], fetch: Any) -> None:
        super().__init__(shards)
        self._fetch = fetch

    def __getitem__(self, name: str) -> str:
        return self._fetch(super().__getitem__(name))
