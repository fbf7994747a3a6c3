#!/usr/bin/env bash
# gpu_check.sh - the DSKD check on the offline GPU machine, one script, time-boxed (< 8 min on
# an H100). From the repository root, with the wheels in ./.whl (see "fetch" below):
#
#     bash benchmarks/gpu_check.sh                 # GPU machine: DEVICE=cuda, bf16
#     bash benchmarks/gpu_check.sh fetch           # where PyPI is reachable: fill ./.whl
#     DEVICE=cpu bash benchmarks/gpu_check.sh      # CPU dry run (.venv, tiny shapes, no install)
#
# Steps (each prints PASS/FAIL/SKIP <step>; the exit code is 0 iff nothing FAILed):
#   install     the carried wheels into $SITE (pip --no-index --no-deps --target)
#   smoke       a 3-minute smoke check of the GPU machine ($SMOKE_SCRIPT), shortened, if given
#   pytest_gpu  pytest -m gpu tests/unit/test_gpu.py: 4-bit nf4 and 8-bit teachers on CUDA, the loss
#               in bf16 against float32 (same vocabulary and CMA), a trainer-shaped step
#   make_models random-weight models with real shapes, made on the GPU and saved: a TinyLlama-1.1B
#               student, a Llama-2-7B teacher (same vocabulary), a Qwen2.5-3B teacher (CMA), with
#               tiny trained tokenizers (sentencepiece-style / byte-level BPE, ids < real vocab)
#   bench       benchmarks/gpu_step_bench.py: tokens/s and max_memory_allocated of (a) LoRA SFT,
#               (b) teacher forward, (c) DSKD step (same vocab and CMA), seq 1024/2048, micro-batch
#               1-8; a table and JSON under $OUT/bench; then target_time / target_memory
#   e2e_cma     python -m axolotl.cli.train with the plugin: bf16, LoRA, 4-bit Qwen2.5-3B-shaped
#               teacher, TinyLlama-shaped student, different vocabularies (CMA), a few steps
#   zero2       a single-process DeepSpeed ZeRO-2 run with the plugin (tiny models), with
#               example_configs/deepspeed/zero2.json; the projectors must be saved, non-empty
#               (ZeRO-3 and FSDP are refused at validation: they shard the LM head the loss reads).
#               Then zero2_resume resumes it from checkpoint-2 (DeepSpeed's resume path, which never
#               calls _load_from_checkpoint): the projectors must be restored ("DSKD projectors
#               restored from ..." in the log), trained on and saved.
#               When one fails, extra_zeroN_patched reruns it with the proposed DeepSpeed fixes
#               applied as monkeypatches (reported, not counted).
#
# Env: DEVICE (cuda|cpu), PY, WHL (./.whl), SITE (/tmp/site), WORK (/tmp/dskd_gpu_check, wiped),
# OUT (results; default ./outputs/gpu_check), TOTAL_S (time budget, 450), BENCH_S (150),
# SKIP_INSTALL=1, SMOKE=0, SMOKE_S (70), SMOKE_SCRIPT (the smoke check), FETCH_SCRIPT (a script
# that downloads the axolotl + bitsandbytes wheels into the folder it is given), MODELS (model
# folder, kept between runs),
# ZERO=0 (skip the DeepSpeed runs), ZERO_PATCHED=0 (no patched reruns), STEPS (the steps to run,
# default "smoke pytest_gpu make_models bench e2e_cma zero2"; models already in $MODELS are
# reused), DS_SITE (CPU dry run: a folder with deepspeed importable).
# Results: $OUT/gpu_check/{summary.txt,summary.json,*.log,*.yml}, $OUT/bench/step_bench.{json,md}.
set -u
T0=$(date +%s)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
MODE=${1:-check}
DEVICE=${DEVICE:-cuda}
if [ "$DEVICE" = cpu ]; then
  [ -x "$REPO/.venv/bin/python" ] && PY=${PY:-$REPO/.venv/bin/python}
  SKIP_INSTALL=${SKIP_INSTALL:-1}; SMOKE=${SMOKE:-0}; AX_BF16=${AX_BF16:-false}; TINY=${TINY:-1}
fi
PY=${PY:-python3}
WHL=${WHL:-$REPO/.whl}
SITE=${SITE:-/tmp/site}
WORK=${WORK:-/tmp/dskd_gpu_check}
OUT=${OUT:-$REPO/outputs/gpu_check}
TOTAL_S=${TOTAL_S:-450}
BENCH_S=${BENCH_S:-150}
SMOKE=${SMOKE:-1}
SMOKE_S=${SMOKE_S:-70}
AX_BF16=${AX_BF16:-true}
TINY=${TINY:-0}
ZERO=${ZERO:-1}
ZERO_PATCHED=${ZERO_PATCHED:-1}
STEPS=${STEPS:-smoke pytest_gpu make_models bench e2e_cma zero2}
BUDGET_MIB=64

# ==================================================================================== fetch
if [ "$MODE" = fetch ]; then
  # Where PyPI is reachable: the wheels of $FETCH_SCRIPT (axolotl + bitsandbytes for the GPU
  # machine's CPython 3.12), plus DeepSpeed (sdist only on PyPI: built here as a
  # pure-python wheel, ops compiled just-in-time if ever needed) and its small dependencies.
  set -e
  mkdir -p "$WHL"
  if [ -n "${FETCH_SCRIPT:-}" ]; then bash "$FETCH_SCRIPT" "$WHL"; else echo "FETCH_SCRIPT not set; DeepSpeed only"; fi
  TMP=$(mktemp -d)
  "$PY" -m pip download -q --no-deps -d "$TMP" "deepspeed>=0.18.6,<0.19"
  DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WHL" "$TMP"/deepspeed-*.tar.gz \
    || DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps -w "$WHL" "$TMP"/deepspeed-*.tar.gz
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHL" hjson py-cpuinfo msgpack ninja einops
  rm -rf "$TMP"
  set +e
  whl=$(du -cb "$WHL"/*.whl | tail -1 | cut -f1)
  repo=$(git -C "$REPO" ls-files -co --exclude-standard -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
  ds=$(du -cb "$WHL"/deepspeed-*.whl "$WHL"/hjson-*.whl "$WHL"/py_cpuinfo-*.whl "$WHL"/msgpack-*.whl \
        "$WHL"/ninja-*.whl "$WHL"/einops-*.whl 2>/dev/null | tail -1 | cut -f1)
  awk -v w="$whl" -v r="$repo" -v d="$ds" -v b="$BUDGET_MIB" 'BEGIN {
    m = 1048576; printf "wheels %.1f MiB (DeepSpeed and its deps %.1f MiB) + repo %.1f MiB = %.1f MiB of %d MiB\n",
    w/m, d/m, r/m, (w+r)/m, b; if ((w+r)/m > b) { print "OVER BUDGET: slim the bitsandbytes wheel (keep its CPU and CUDA 13 libraries) or drop DeepSpeed"; exit 1 } }'
  exit $?
fi

# ==================================================================================== setup
export AXOLOTL_DO_NOT_TRACK=1 DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
       TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 WANDB_DISABLED=true WANDB_MODE=disabled \
       TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
case "$WORK" in
  /tmp/?*) rm -rf "$WORK" ;;
  *) echo "refusing to wipe WORK=$WORK (must be under /tmp)"; exit 2 ;;
esac
mkdir -p "$WORK" "$OUT/gpu_check"
export HF_HOME="$WORK/hf_home"
if [ "$TINY" = 1 ]; then MODELS=${MODELS:-/tmp/dskd_models_tiny}; TINYFLAG=--tiny; else MODELS=${MODELS:-/tmp/dskd_models}; TINYFLAG=; fi

NPASS=0; NFAIL=0; NSKIP=0; FAILED=""
STEPS_JSON="$WORK/steps.jsonl"; : > "$STEPS_JSON"
elapsed() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( TOTAL_S - $(elapsed) )); }
record() {  # STATUS STEP MESSAGE
  local line="$1 $2 [$(elapsed)s] ${3:-}"
  echo "$line"; echo "$line" >> "$WORK/summary.txt"
  "$PY" - "$1" "$2" "$(elapsed)" "${3:-}" >> "$STEPS_JSON" 2>/dev/null <<'PYEOF' || true
import json, sys
print(json.dumps({"status": sys.argv[1], "step": sys.argv[2], "at_s": int(sys.argv[3]), "detail": sys.argv[4]}))
PYEOF
}
pass() { NPASS=$((NPASS+1)); record PASS "$@"; }
fail() { NFAIL=$((NFAIL+1)); FAILED="$FAILED $1"; record FAIL "$@"; }
skip() { NSKIP=$((NSKIP+1)); record SKIP "$@"; }
xrecord() { record "$1" "extra_$2" "${3:-} (extra, not counted)"; }
# timeout for a step: min(WANT, time left - RESERVE for the steps after it); "" when under 5 s
wanted() { [[ " $STEPS " == *" $1 "* ]]; }
tmo() { local t=$(( $(left) - ${2:-0} )); [ "$t" -gt "$1" ] && t=$1; [ "$t" -ge 5 ] && echo "$t" || echo ""; }
tailog() { echo "----- last lines of $1 -----"
  grep -v -e 'MatMul8bitLt: inputs will be cast' -e '^Loading weights' -e 'it/s\]$' "$1" | tail -n "${2:-30}"; echo "-----"; }
finish() {
  cp "$WORK"/*.log "$WORK"/*.yml "$WORK/summary.txt" "$OUT/gpu_check/" 2>/dev/null
  "$PY" - "$STEPS_JSON" "$OUT/gpu_check/summary.json" "$NPASS" "$NFAIL" "$NSKIP" "$(elapsed)" "$DEVICE" <<'PYEOF' 2>/dev/null
import json, sys
steps = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
json.dump({"device": sys.argv[7], "passed": int(sys.argv[3]), "failed": int(sys.argv[4]), "skipped": int(sys.argv[5]),
           "elapsed_s": int(sys.argv[6]), "steps": steps}, open(sys.argv[2], "w"), indent=2)
PYEOF
  echo "SUMMARY: $NPASS passed, $NFAIL failed${FAILED:+ (failed:$FAILED)}, $NSKIP skipped in $(elapsed)s (budget ${TOTAL_S}s); results in $OUT"
  [ "$NFAIL" -eq 0 ]; exit $?
}

echo "== gpu_check.sh: DEVICE=$DEVICE PY=$PY WHL=$WHL SITE=$SITE WORK=$WORK OUT=$OUT MODELS=$MODELS TOTAL_S=$TOTAL_S"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/gpu: /'
fi

# ==================================================================================== install
if [ "${SKIP_INSTALL:-0}" = 1 ]; then
  skip install "SKIP_INSTALL=1: using $PY as it is"
else
  n=$(ls "$WHL"/*.whl 2>/dev/null | wc -l)
  if [ "$n" -eq 0 ]; then
    fail install "no wheels in $WHL (run 'bash benchmarks/gpu_check.sh fetch' where PyPI is reachable)"; finish
  fi
  if timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
       --target "$SITE" "$WHL"/*.whl > "$WORK/install.log" 2>&1; then
    pass install "$n wheels ($(du -shL "$WHL" | cut -f1)) -> $SITE"
  else
    tailog "$WORK/install.log"; fail install "pip failed"; finish
  fi
  export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ -n "${DS_SITE:-}" ]; then export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$DS_SITE"; fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

# ==================================================================================== helpers
cat > "$WORK/ax_check.py" <<'PYEOF'
"""log LOG: the last logged step and the final train line of an axolotl run (fails on NaN/inf,
or without DSKD metrics); proj DIR [d_s d_t cross]: the saved projectors are complete."""
import ast, json, math, re, sys
from pathlib import Path

def log(path):
    text = Path(path).read_text(errors="replace").replace("\r", "\n")
    rows = []
    for m in re.finditer(r"\{'(?:loss|train_runtime)'[^{}]*\}", text):
        try:
            rows.append(ast.literal_eval(m.group(0)))
        except (ValueError, SyntaxError):
            pass
    steps = [r for r in rows if "loss" in r]
    final = [r for r in rows if "train_runtime" in r]
    if not steps or not final:
        sys.exit(f"no training log lines in {path}")
    last = steps[-1]
    losses = [float(r["loss"]) for r in steps] + [float(final[-1]["train_loss"])]
    mem = last.get("memory/max_allocated (GiB)", "?")
    print(f"FINAL_LOSS train_loss={final[-1]['train_loss']} losses={[round(x, 4) for x in losses]} "
          f"max_allocated_GiB={mem} t2s_acc={last.get('dskd/t2s_acc', '?')} "
          f"kd_teacher={last.get('dskd/kd_teacher', '?')} runtime_s={final[-1]['train_runtime']}")
    if not all(math.isfinite(x) for x in losses):
        sys.exit("non-finite loss")
    if not any(k.startswith("dskd/") for k in last):
        sys.exit("no dskd/* metrics: the DSKD trainer did not run")

def proj(directory, *dims):
    from safetensors.torch import load_file
    import torch
    d = Path(directory)
    tensors = load_file(d / "dskd_projectors.safetensors")
    meta = json.loads((d / "dskd_projectors.json").read_text())
    shapes = {k: list(v.shape) for k, v in tensors.items()}
    if shapes != meta["shapes"]:
        sys.exit(f"projector shapes {shapes} differ from the metadata {meta['shapes']}")
    if dims:
        d_s, d_t, cross = int(dims[0]), int(dims[1]), dims[2] == "1"
        want = {"t2s.weight": [d_s, d_t], "t2s.bias": [d_s], "s2t.weight": [d_t, d_s], "s2t.bias": [d_t]}
        if cross:
            want.update({"query.weight": [2 * d_t, 2 * d_s], "query.bias": [2 * d_t]})
        if shapes != want:
            sys.exit(f"projector shapes {shapes}, expected {want} (empty = saved while partitioned)")
    for k, v in tensors.items():
        if v.numel() == 0 or not bool(torch.isfinite(v.float()).all()) or float(v.float().abs().sum()) == 0:
            sys.exit(f"projector {k} is empty, zero or non-finite")
    print(f"projectors ok: {shapes} dtype={next(iter(tensors.values())).dtype} step={meta.get('global_step')}")

{"log": log, "proj": proj}[sys.argv[1]](*sys.argv[2:])
PYEOF

cat > "$WORK/make_data.py" <<'PYEOF'
"""Alpaca rows for the axolotl runs: long ones (hundreds of tokens) and tiny models for ZeRO."""
import random, sys
from pathlib import Path
from axolotl_dskd.dolly import write_jsonl
from dskd_devkit.task import arithmetic_rows, task_corpus
from dskd_devkit.tiny_tokenizers import bpe_tokenizer, sentencepiece_tokenizer
from dskd_devkit.training import save_pair, tiny_model
work = Path(sys.argv[1])
rows = arithmetic_rows(64 * 24, seed=0)
long_rows = []
for i in range(64):
    chunk = rows[i * 24:(i + 1) * 24]
    long_rows.append({"instruction": "Add each pair of numbers and explain.", "input": chunk[0]["input"],
                      "output": " ".join(f"{r['input']} is {r['output']}." for r in chunk)})
write_jsonl(long_rows, work / "data" / "long.jsonl")
write_jsonl(arithmetic_rows(64, seed=1), work / "data" / "short.jsonl")
corpus = task_corpus()
bpe = bpe_tokenizer(corpus)
sp = sentencepiece_tokenizer(corpus, pad_token="</s>")
save_pair(tiny_model("qwen2", bpe, hidden_size=128, seed=0), bpe, work / "tiny" / "teacher")
save_pair(tiny_model("llama", sp, hidden_size=64, seed=2), sp, work / "tiny" / "student_sp")
print("data and tiny models under", work)
PYEOF

# the proposed DeepSpeed fixes, as monkeypatches, for the extra_zeroN_patched reruns
cat > "$WORK/dskd_zero_patch.py" <<'PYEOF'
"""Proposed DeepSpeed support for axolotl_dskd (trainer.py / plugin.py), as monkeypatches.

teacher:    load the teacher as if ZeRO-3 were off (a plain frozen model outside the engine;
            Axolotl patches transformers' is_deepspeed_zero3_enabled to True for the run).
projectors: register the projectors as a submodule of the student before the engine is built,
            so DeepSpeed names, partitions (ZeRO-3), reduces and updates them like any other
            parameter; keep them in their own optimizer group; gather them to save.
weights:    ZeRO-3 partitions the student's LM head and embeddings: gather a frozen copy.
"""
import contextlib


@contextlib.contextmanager
def outside_zero3():
    import transformers.integrations.deepspeed as tds
    import transformers.modeling_utils as mu
    ref = tds._hf_deepspeed_config_weak_ref
    saved = mu.is_deepspeed_zero3_enabled, tds.is_deepspeed_zero3_enabled
    tds._hf_deepspeed_config_weak_ref = None
    mu.is_deepspeed_zero3_enabled = tds.is_deepspeed_zero3_enabled = lambda: False
    try:
        yield
    finally:
        tds._hf_deepspeed_config_weak_ref = ref
        mu.is_deepspeed_zero3_enabled, tds.is_deepspeed_zero3_enabled = saved


def _zero3_param(p) -> bool:
    return hasattr(p, "ds_id")


@contextlib.contextmanager
def gathered(params):
    params = [p for p in params if _zero3_param(p)]
    if not params:
        yield
        return
    import deepspeed
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def apply(patches):
    import axolotl_dskd.integration.plugin as plugin
    import axolotl_dskd.integration.trainer as tr
    from axolotl_dskd.core.models import causal_lm

    if "teacher" in patches:
        _load = plugin.load_teacher

        def load_teacher(*a, **kw):
            with outside_zero3():
                return _load(*a, **kw)

        plugin.load_teacher = load_teacher

    if "projectors" in patches:
        T = tr.DSKDTrainer
        _attach = T.attach_teacher

        def attach_teacher(self, teacher, projectors, *a, **kw):
            _attach(self, teacher, projectors, *a, **kw)
            if self.projectors is not None and self.is_deepspeed_enabled:
                causal_lm(self.model).add_module("dskd_projectors", self.projectors)

        T.attach_teacher = attach_teacher

        def create_optimizer(self, model=None):
            optimizer = super(T, self).create_optimizer(model) if model is not None else super(T, self).create_optimizer()
            if self.projectors is not None:
                mine = {id(p) for p in self.projectors.parameters()}
                for group in optimizer.param_groups:
                    group["params"] = [p for p in group["params"] if id(p) not in mine]
                optimizer.add_param_group({"params": list(self.projectors.parameters()),
                                           "lr": self.projector_lr, "weight_decay": self.args.weight_decay})
            return optimizer

        T.create_optimizer = create_optimizer

        def save_projectors(self, output_dir):
            if self.projectors is None:
                return
            params = list(self.projectors.parameters())
            if any(_zero3_param(p) for p in params):
                import torch.distributed as torch_dist
                if not (torch_dist.is_available() and torch_dist.is_initialized()):
                    return  # Axolotl's post_train, after the process group is gone: already saved
            with gathered(params):  # a collective: every rank
                if self.args.should_save:
                    path = tr.save_projectors(self.projectors, output_dir, self.projector_metadata())
                    tr.LOG.info("DSKD projectors saved to %s", path)

        T.save_projectors = save_projectors

    if "weights" in patches:
        _lm, _emb = tr.lm_head_weight, tr.input_embedding_weight

        def copy_if_partitioned(fn):
            def wrapped(model):
                w = fn(model)
                if not _zero3_param(w):
                    return w
                if w.requires_grad:
                    raise ValueError("DSKD under ZeRO-3 needs a frozen LM head and embeddings (LoRA)")
                with gathered([w]):
                    return w.detach().clone()
            return wrapped

        tr.lm_head_weight = copy_if_partitioned(_lm)
        tr.input_embedding_weight = copy_if_partitioned(_emb)
PYEOF

cat > "$WORK/train.py" <<'PYEOF'
"""python -m axolotl.cli.train CONFIG, optionally with DSKD_PATCH=teacher,projectors,weights
(the proposed DeepSpeed fixes) and DSKD_GLOO=1 (CPU dry run: Axolotl hardcodes NCCL)."""
import os, runpy, sys

if __name__ == "__main__":
    if os.environ.get("DSKD_GLOO") == "1":
        import deepspeed.comm as dist
        _init = dist.init_distributed
        def _gloo(*a, **kw):
            kw["dist_backend"] = "gloo"
            return _init(*a, **kw)
        dist.init_distributed = _gloo
    patches = [p for p in os.environ.get("DSKD_PATCH", "").split(",") if p]
    if patches:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import dskd_zero_patch
        dskd_zero_patch.apply(patches)
    sys.argv = ["axolotl.cli.train", *sys.argv[1:]]
    runpy.run_module("axolotl.cli.train", run_name="__main__")
PYEOF

# write_yaml NAME BASE TEACHER DATA SEQ MB STEPS [EXTRA LINES]
write_yaml() {
  cat > "$WORK/$1.yml" <<YEOF
base_model: $2
plugins:
  - axolotl_dskd.DSKDPlugin
dskd_teacher: $3
dskd_teacher_load_in_4bit: true
datasets:
  - path: $4
    type: alpaca
    ds_type: json
dataset_prepared_path: $WORK/prepared_$1
val_set_size: 0
sequence_len: $5
sample_packing: false
adapter: lora
lora_r: 16
lora_alpha: 32
lora_dropout: 0.0
lora_target_linear: true
lora_mlp_kernel: false
lora_qkv_kernel: false
lora_o_kernel: false
lora_embedding_kernel: false
micro_batch_size: $6
gradient_accumulation_steps: 2
max_steps: $7
learning_rate: 0.0002
optimizer: adamw_torch
lr_scheduler: cosine
bf16: $AX_BF16
logging_steps: 1
save_steps: 2
save_safetensors: true
dataloader_num_workers: 0
output_dir: $WORK/out_$1
${8:-}
YEOF
}

# known DeepSpeed failures of the unpatched trainer, in words
diagnose() {
  if grep -q 'self.param_names\[lp\]' "$1"; then echo "(the projectors are in the optimizer but not in the module DeepSpeed wraps)"
  elif grep -q "has no attribute 'partition_numel'\|has no attribute 'ds_" "$1"; then echo "(the projectors are not ZeRO-3 parameters)"
  elif grep -q 'Zero-3 is not compatible with passing a .device_map' "$1"; then echo "(the teacher is loaded while ZeRO-3 is active)"
  elif grep -q 'integer division or modulo by zero\|ZeroDivisionError' "$1"; then echo "(a ZeRO-3-partitioned LM head reached the loss)"
  fi
}

# run_train NAME TIMEOUT [ENV...] : python -m axolotl.cli.train on $WORK/NAME.yml
run_train() {
  local name=$1 t=$2; shift 2
  ( cd "$WORK" && env "$@" timeout "$t" "$PY" "$WORK/train.py" "$WORK/$name.yml" > "$WORK/$name.log" 2>&1 )
}

# ==================================================================================== smoke
SMOKE_SCRIPT=${SMOKE_SCRIPT:-}
if [ "$SMOKE" != 1 ] || ! wanted smoke; then
  skip smoke "SMOKE=$SMOKE STEPS=$STEPS"
elif [ -z "$SMOKE_SCRIPT" ]; then
  skip smoke "SMOKE_SCRIPT not set"
elif t=$(tmo "$SMOKE_S" 380); [ -z "$t" ]; then
  skip smoke "time budget"
else
  OUT="$OUT" WHL="$WHL" SITE="$SITE" PY="$PY" DEVICE="$DEVICE" AX_BF16="$AX_BF16" SKIP_INSTALL=1 \
    EXTRA_QLORA=0 MAX_S="$t" WORK=/tmp/axcheck timeout $((t + 15)) bash "$SMOKE_SCRIPT" > "$WORK/smoke.log" 2>&1
  rc=$?
  grep -E '^(PASS|FAIL|SUMMARY|gpu:|FINAL_LOSS)' "$WORK/smoke.log" | sed 's/^/  smoke| /'
  if [ $rc -eq 0 ]; then pass smoke "$(grep '^SUMMARY' "$WORK/smoke.log")"
  else tailog "$WORK/smoke.log" 20; fail smoke "rc=$rc $(grep '^SUMMARY' "$WORK/smoke.log")"; fi
fi

# ==================================================================================== pytest -m gpu
if ! wanted pytest_gpu; then
  skip pytest_gpu "not in STEPS"
elif t=$(tmo 90 300); [ -z "$t" ]; then
  skip pytest_gpu "time budget"
else
  [ "$DEVICE" = cpu ] && export DSKD_GPU_TESTS_ON_CPU=1
  timeout "$t" "$PY" -m pytest -m gpu tests/unit/test_gpu.py -q -rfEs > "$WORK/pytest_gpu.log" 2>&1
  rc=$?
  res=$(grep -E '^[0-9]+ (passed|failed|skipped|error)|^=+ .*(passed|failed|skipped|error)' "$WORK/pytest_gpu.log" | tail -1)
  if [ $rc -eq 0 ] && ! grep -qE '[0-9]+ skipped' <<< "$res"; then
    pass pytest_gpu "$res"
  else
    tailog "$WORK/pytest_gpu.log" 40; fail pytest_gpu "rc=$rc $res$([ $rc -eq 124 ] && echo ' (timeout)')"
  fi
fi

# ==================================================================================== models + data
MODELS_OK=0
if ! wanted make_models; then
  [ -f "$MODELS/student/tokenizer.json" ] && [ -f "$MODELS/teacher_cma/tokenizer.json" ] && MODELS_OK=1
  skip make_models "not in STEPS (models in $MODELS: $([ $MODELS_OK = 1 ] && echo reused || echo none))"
elif t=$(tmo 150 220); [ -z "$t" ]; then
  skip make_models "time budget"
elif timeout "$t" "$PY" benchmarks/gpu_step_bench.py --make-only --tokenizers --device "$DEVICE" \
       --model-dir "$MODELS" $TINYFLAG > "$WORK/make_models.log" 2>&1; then
  MODELS_OK=1
  grep -E 'params|reusing|tokenizer with' "$WORK/make_models.log" | sed 's/^/  /'
  pass make_models "$MODELS ($(du -sh "$MODELS" | cut -f1))"
else
  rc=$?; tailog "$WORK/make_models.log"; fail make_models "rc=$rc"
fi
if (wanted e2e_cma || wanted zero2) && t=$(tmo 60 0) && [ -n "$t" ]; then
  # data and tiny models for the axolotl runs
  timeout "$t" "$PY" "$WORK/make_data.py" "$WORK" > "$WORK/make_data.log" 2>&1 || tailog "$WORK/make_data.log" 15
fi

# ==================================================================================== bench
if ! wanted bench; then
  skip bench "not in STEPS"
elif [ $MODELS_OK != 1 ]; then
  skip bench "no models"
elif t=$(tmo $((BENCH_S + 30)) 150); [ -z "$t" ]; then
  skip bench "time budget"
else
  mkdir -p "$OUT/bench"
  timeout "$t" "$PY" benchmarks/gpu_step_bench.py --device "$DEVICE" --model-dir "$MODELS" $TINYFLAG \
    --out "$OUT/bench" --time-budget $((t - 25)) --warmup 1 --iters 4 --max-point-s 3 > "$WORK/bench.log" 2>&1
  rc=$?
  if [ -f "$OUT/bench/step_bench.json" ]; then
    cat "$OUT/bench/step_bench.md"
    if [ $rc -eq 0 ]; then pass bench "$OUT/bench/step_bench.json"; else tailog "$WORK/bench.log" 15; fail bench "rc=$rc (see bench.log)"; fi
    "$PY" - "$OUT/bench/step_bench.json" > "$WORK/targets.txt" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
rows = r["summary"]
for kind, key in (("time", "time_ok"), ("memory", "mem_ok")):
    judged = [x for x in rows if x.get(key) is not None]
    bad = [x for x in judged if not x[key]]
    detail = ", ".join(
        f"{x['variant']} seq={x['seq']} mb={x['mb']} "
        + (f"ratio={x['time_ratio']:.2f}" if kind == "time" else f"extra={x['mem_extra_gb']:+.2f}GB")
        for x in (bad or judged)[:6])
    status = "NONE" if not judged else ("FAIL" if bad else "PASS")
    print(status, f"target_{kind}", f"{len(judged) - len(bad)}/{len(judged)} points meet it; {'misses: ' if bad else ''}{detail}")
PYEOF
    while read -r status step detail; do
      if [ "$TINY" = 1 ] || [ "$DEVICE" != cuda ]; then  # tiny shapes on a CPU say nothing about the targets
        record INFO "$step" "$status: $detail (not judged: targets apply to real shapes on CUDA)"; continue
      fi
      case $status in PASS) pass "$step" "$detail" ;; FAIL) fail "$step" "$detail" ;; *) skip "$step" "nothing measured" ;; esac
    done < "$WORK/targets.txt"
  else
    tailog "$WORK/bench.log" 30; fail bench "rc=$rc, no step_bench.json$([ $rc -eq 124 ] && echo ' (timeout)')"
  fi
fi

# ==================================================================================== e2e CMA
if ! wanted e2e_cma; then
  skip e2e_cma "not in STEPS"
elif [ $MODELS_OK != 1 ] || [ ! -f "$WORK/data/long.jsonl" ]; then
  skip e2e_cma "no models or data"
elif t=$(tmo 120 80); [ -z "$t" ]; then
  skip e2e_cma "time budget"
else
  # real shapes: rows of ~300-600 tokens at sequence_len 1024; tiny models (CPU): short rows
  if [ "$TINY" = 1 ]; then SEQ=256; DATA=short; PROJ_DIMS="64 64"; else SEQ=1024; DATA=long; PROJ_DIMS="2048 2048"; fi
  write_yaml e2e_cma "$MODELS/student" "$MODELS/teacher_cma" "$WORK/data/$DATA.jsonl" "$SEQ" 2 3
  run_train e2e_cma "$t"
  rc=$?
  if [ $rc -eq 0 ] && chk=$("$PY" "$WORK/ax_check.py" log "$WORK/e2e_cma.log" 2>&1) \
     && pj=$("$PY" "$WORK/ax_check.py" proj "$WORK/out_e2e_cma" $PROJ_DIMS 1 2>&1) \
     && [ -f "$WORK/out_e2e_cma/adapter_model.safetensors" ]; then
    echo "  $chk"; echo "  $pj"
    grep -m1 -E 'DSKD: ' "$WORK/e2e_cma.log" | sed 's/^/  /'
    pass e2e_cma "rc=0, adapter and projectors saved"
  else
    why=$(grep -E '^\[rank0\]: [A-Za-z]*(Error|Exception)|^[A-Za-z.]*(Error|Exception):' "$WORK/e2e_cma.log" | tail -1 | cut -c1-300)
    tailog "$WORK/e2e_cma.log" 40; fail e2e_cma "rc=$rc$([ $rc -eq 124 ] && echo ' (timeout)') ${why:-} ${chk:-} ${pj:-}"
  fi
fi

# ==================================================================================== ZeRO-2 / ZeRO-3
zero_resume() {  # STAGE RESERVE: resume the ZeRO run from its checkpoint-2 (DeepSpeed's own resume path)
  local z=$1 name="zero$1_resume" t rc pj
  t=$(tmo 60 "$2")
  if [ -z "$t" ]; then skip "$name" "time budget"; return; fi
  write_yaml "$name" "$WORK/tiny/student_sp" "$WORK/tiny/teacher" "$WORK/data/short.jsonl" 256 2 4 \
    "deepspeed: $REPO/example_configs/deepspeed/zero$z.json
resume_from_checkpoint: $WORK/out_zero$z/checkpoint-2"
  local envs=(MASTER_ADDR=127.0.0.1 "MASTER_PORT=$((29510 + z))")
  [ "$DEVICE" = cpu ] && envs+=(DSKD_GLOO=1)
  run_train "$name" "$t" "${envs[@]}"
  rc=$?
  if [ $rc -eq 0 ] && grep -q "DSKD projectors restored from $WORK/out_zero$z/checkpoint-2" "$WORK/$name.log" \
     && pj=$("$PY" "$WORK/ax_check.py" proj "$WORK/out_$name" 64 128 1 2>&1); then
    echo "  $pj"
    pass "$name" "ZeRO-$z resumed from checkpoint-2: projectors restored, trained on, saved"
  else
    tailog "$WORK/$name.log" 25
    fail "$name" "ZeRO-$z resume: rc=$rc$([ $rc -eq 124 ] && echo ' (timeout)') ${pj:-}"
  fi
}

zero_run() {  # STAGE RESERVE
  local z=$1 name="zero$1" t rc chk pj
  if ! "$PY" -c "import deepspeed" > "$WORK/$name.import.log" 2>&1; then
    skip "$name" "deepspeed is not importable: add its wheel with 'bash benchmarks/gpu_check.sh fetch' ($(tail -1 "$WORK/$name.import.log"))"
    return
  fi
  t=$(tmo 90 "$2")
  if [ -z "$t" ]; then skip "$name" "time budget"; return; fi
  write_yaml "$name" "$WORK/tiny/student_sp" "$WORK/tiny/teacher" "$WORK/data/short.jsonl" 256 2 4 \
    "deepspeed: $REPO/example_configs/deepspeed/zero$z.json"
  local envs=(MASTER_ADDR=127.0.0.1 "MASTER_PORT=$((29500 + z))")
  [ "$DEVICE" = cpu ] && envs+=(DSKD_GLOO=1)
  run_train "$name" "$t" "${envs[@]}"
  rc=$?
  if [ $rc -eq 0 ] && chk=$("$PY" "$WORK/ax_check.py" log "$WORK/$name.log" 2>&1) \
     && pj=$("$PY" "$WORK/ax_check.py" proj "$WORK/out_$name" 64 128 1 2>&1) \
     && pj2=$("$PY" "$WORK/ax_check.py" proj "$WORK/out_$name/checkpoint-2" 64 128 1 2>&1); then
    echo "  $chk"; echo "  $pj"
    pass "$name" "ZeRO-$z: rc=0, projectors trained and saved (final and checkpoint-2)"
    zero_resume "$z" "$2"
    return
  fi
  local why
  why=$(grep -E '^\[rank0\]: [A-Za-z]*(Error|Exception)|^[A-Za-z.]*(Error|Exception):' "$WORK/$name.log" | tail -1 | cut -c1-300)
  tailog "$WORK/$name.log" 25
  fail "$name" "ZeRO-$z: rc=$rc$([ $rc -eq 124 ] && echo ' (timeout)') ${why:-} $(diagnose "$WORK/$name.log") ${chk:-} ${pj:-}"
  if [ "$ZERO_PATCHED" = 1 ] && t=$(tmo 90 "$2") && [ -n "$t" ]; then
    write_yaml "${name}_patched" "$WORK/tiny/student_sp" "$WORK/tiny/teacher" "$WORK/data/short.jsonl" 256 2 4 \
      "deepspeed: $REPO/example_configs/deepspeed/zero$z.json"
    run_train "${name}_patched" "$t" "${envs[@]}" DSKD_PATCH=teacher,projectors,weights
    rc=$?
    if [ $rc -eq 0 ] && pj=$("$PY" "$WORK/ax_check.py" proj "$WORK/out_${name}_patched" 64 128 1 2>&1) \
       && chk=$("$PY" "$WORK/ax_check.py" log "$WORK/${name}_patched.log" 2>&1); then
      echo "  $chk"; echo "  $pj"
      xrecord PASS "${name}_patched" "ZeRO-$z with the proposed fixes (DSKD_PATCH=teacher,projectors,weights)"
    else
      why=$(grep -E '^\[rank0\]: [A-Za-z]*(Error|Exception)|^[A-Za-z.]*(Error|Exception):' "$WORK/${name}_patched.log" | tail -1 | cut -c1-300)
      tailog "$WORK/${name}_patched.log" 25
      xrecord FAIL "${name}_patched" "rc=$rc ${why:-}"
    fi
  fi
}
if [ "$ZERO" != 1 ] || ! wanted zero2; then
  skip zero2 "ZERO=$ZERO STEPS=$STEPS"
elif [ ! -d "$WORK/tiny/teacher" ]; then
  skip zero2 "no tiny models"
else
  zero_run 2 45
fi

finish
