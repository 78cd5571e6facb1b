#!/usr/bin/env bash
# GPU checks of the activation cache (issue 20), one command, under 8 minutes on one CUDA GPU:
#
#   bash scripts/gpu_check.sh            # PYTHON=... to pick the interpreter, OUT=DIR to keep the files
#
# It prints every ratio the issue's GPU bars ask for, each measured in one process:
#   1. GPT-2-small shape (12 layers, d 768, 50k vocabulary, random weights), bfloat16, hook at
#      layer 6, and the organism: misfeat / min(bare-forward ceiling, write ceiling)
#      (bars: >= 0.85 for GPT-2, >= 0.5 for the organism), the same with the token cache emptied;
#   2. host-only (forward replaced by a stand-in) at the GPU batch size, d 768 bfloat16: misfeat / write ceiling;
#   3. torchrun --nproc_per_node 1 (and N = all GPUs when there are several: NCCL) writing a store
#      byte-identical to a single process's;
#   4. the CUDA tests (`pytest -m gpu`) of the cache and of the force probe.
# DEVICE=cpu SMALL=1 runs the same steps on a CPU with tiny sizes (a dry run of the script
# itself, not a measurement; step 4 is skipped there). The organism is built on first use (about 3.5 min of CPU); point MISFEAT_HOME at a built one
# to save that. Timings on a shared or throttled machine vary: each benchmark repeats 3 times and
# prints best and median.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export HF_HUB_OFFLINE=1 MISFEAT_PROGRESS=0 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$OUT"
export MISFEAT_TOKEN_CACHE="$OUT/tokens"
started=$(date +%s)
step() { echo; echo "=== $* ($(( $(date +%s) - started )) s)"; }

DEVICE=${DEVICE:-cuda}
if [ "${SMALL:-0}" = 1 ]; then
    PROMPTS=300 GPT2_PROMPTS=8 REPEATS=1 STORE_MB=16 THREADS=1
else
    PROMPTS=50000 GPT2_PROMPTS=20000 REPEATS=3 STORE_MB=512 THREADS=8
fi
if [ "$DEVICE" = cuda ]; then
    "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: run this on a GPU machine')"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$PY" -c "import torch, misfeat; print('torch', torch.__version__, 'misfeat', misfeat.__version__)"
echo "load: $(uptime)"
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")

step "1. caching at the limit: GPT-2-small shape (hook at layer 6) and the organism, bfloat16"
"$PY" scripts/bench_cache.py --device "$DEVICE" --dtype bfloat16 --models organism,gpt2 --gpt2-layer 6 \
    --prompts "$PROMPTS" --gpt2-prompts "$GPT2_PROMPTS" --repeats "$REPEATS" --gpt2-repeats "$REPEATS" \
    --methods a,d,e,w --threads "$THREADS" --no-rss --tmp "$OUT" --json "$OUT/bench.json"

step "2. host-only at the GPU batch size (65536 tokens), d 768 bfloat16"
"$PY" scripts/bench_cache.py --host-only --widths 768 --dtypes bfloat16 --batch-tokens 65536 \
    --store-mb "$STORE_MB" --repeats "$REPEATS" --threads "$THREADS" --tmp "$OUT" --json "$OUT/host.json"

step "3. torchrun (NCCL on CUDA) against one process"
"$PY" - "$OUT/prompts.jsonl" "$([ "${SMALL:-0}" = 1 ] && echo 300 || echo 3000)" <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, "scripts")
from bench_cache import make_chat_prompts
from misfeat.models import load_model
make_chat_prompts(Path(sys.argv[1]), int(sys.argv[2]), load_model("organism:chat"))
EOF
ARGS=(cache --model organism:chat --prompts "$OUT/prompts.jsonl" --hooks blocks.1.hook_resid_post
      --dtype bfloat16 --shard-mb 1 --no-fsync)
"$PY" -m misfeat "${ARGS[@]}" --device "$DEVICE" --out "$OUT/single" > /dev/null
for n in 1 $([ "$NGPU" -gt 1 ] && echo "$NGPU"); do
    "$PY" -m torch.distributed.run --standalone --nproc_per_node "$n" -m misfeat "${ARGS[@]}" \
        --device "$DEVICE" --out "$OUT/torchrun-$n" > /dev/null
    "$PY" - "$OUT/single" "$OUT/torchrun-$n" "$n" <<'EOF'
import sys
from pathlib import Path
a, b, n = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
files = lambda d: {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name != "summary.json"}
fa, fb = files(a), files(b)
same = fa == fb
print(f"torchrun --nproc_per_node {n}: {len(fb)} files, store {'byte-identical to' if same else 'DIFFERS from'} "
      "the single process's")
if not same:
    print("  differing:", [k for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)][:10])
    sys.exit(1)
EOF
done

if [ "$DEVICE" = cuda ]; then
    step "4. CUDA tests of the cache"
    "$PY" -m pytest -m gpu -q tests/test_activations.py tests/test_treeforward.py
fi

step "done: files in $OUT; load: $(uptime)"
