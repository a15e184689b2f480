#!/usr/bin/env bash
# The GPU check of the main job, one command, one verdict (meant to finish in under 4 minutes on one
# H200 with 16 cores; not yet run on one): generated photos in a folder dataset, random weights
# (compute does not depend on them), the three steps end to end with their defaults (120 views, fp16
# on the GPU), then benchmarks/bench_extract.py on those photos and on CIFAR-10-sized images. Run from
# the repository root:
#
#   bash benchmarks/gpu_check.sh                        # WordNet from /usr/share/wordnet or nltk's data
#   WORDNET_DIR=/path/to/wordnet bash benchmarks/gpu_check.sh
#
# First, within seconds, it checks every import the steps need and WordNet, and names what is missing.
# Each step runs under its own time limit (LIMIT_<STEP> seconds) and prints its wall time and the GPU's
# utilisation and memory, sampled every 0.5 s; the last line is the verdict:
#   gpu_check: extract_s=… nouns_s=… train_s=… aug_ratio=… plain_ratio=… peak_gpu_gb=… cifar_aug_ratio=… ok=…
# aug_ratio / plain_ratio: the tensor path's augmented (120 views) and plain views/s over the bare fp16
# forward measured in the same run, each pass without its one-time startup; peak_gpu_gb: the most GPU
# memory in use during any step. The photos are written once into $WORK/photos and reused by later runs.
# Wheels in .whl/ (python packages the machine lacks) are installed into /tmp/site first, and a
# WordNet archive .wordnet.tar.gz (of /usr/share/wordnet) is unpacked, when they are there.
# A dry run on the CPU (CI): DEVICE=cpu BACKBONE=tiny-test with small sizes, see .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
N_IMAGES=${N_IMAGES:-1000}       # photos (500 x 375, every third portrait) in N_CLASSES classes: the folder split
N_CLASSES=${N_CLASSES:-20}       # draws 20 train and 10 query images a class (20 classes: 400 train images)
DEVICE=${DEVICE:-cuda}
BACKBONE=${BACKBONE:-ViT-B-16}
WORK=${WORK:-/tmp/gpu_check}
EXTRACT_ARGS=${EXTRACT_ARGS:-}   # extra settings of each step (the dry run's smaller sizes)
NOUNS_ARGS=${NOUNS_ARGS:-}
TRAIN_ARGS=${TRAIN_ARGS:-}
BENCH_ARGS=${BENCH_ARGS:---n_images=1000 --aug_images=200 --views=120 --batch_size=128 --bare_repeat=24 --rounds=2}
CIFAR_ARGS=${CIFAR_ARGS:---n_images=256 --aug_images=256 --views=120 --batch_size=128 --bare_repeat=120 --rounds=2}
LIMIT_EXTRACT=${LIMIT_EXTRACT:-90} LIMIT_NOUNS=${LIMIT_NOUNS:-120} LIMIT_TRAIN=${LIMIT_TRAIN:-90}
LIMIT_BENCH=${LIMIT_BENCH:-90} LIMIT_CIFAR=${LIMIT_CIFAR:-60}
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -z "${WORDNET_DIR:-}" ] && [ -f .wordnet.tar.gz ]; then
  mkdir -p /tmp/wordnet_data && tar -xzf .wordnet.tar.gz -C /tmp/wordnet_data
  WORDNET_DIR=$(dirname "$(find /tmp/wordnet_data -name index.noun | head -1)")
fi
WORDNET_DIR=${WORDNET_DIR:-/usr/share/wordnet}
mkdir -p "$WORK"
rm -rf "$WORK/cache" "$WORK/run" "$WORK/results.jsonl" "$WORK"/util_*.txt "$WORK"/log_*.txt "$WORK/steps.txt"

# 1. within seconds: every import of the three steps and the benchmark, WordNet, the device
python3 - "$WORDNET_DIR" "$DEVICE" "$NOUNS_ARGS" <<'PY' || { echo 'gpu_check: preflight failed ok=False'; exit 1; }
import importlib, os, sys
wordnet_dir, device, nouns_args = sys.argv[1:]
missing = []
for m in ('numpy', 'torch', 'torchvision', 'PIL', 'tqdm', 'open_clip', 'nltk', 'sklearn', 'matplotlib', 'scipy'):
    try:
        importlib.import_module(m)
    except Exception as e:  # noqa: BLE001 - name whatever fails
        missing.append(f'{m} ({type(e).__name__}: {e})')
sys.path.insert(0, '.')
for m in ('dataset_extract', 'nouns_embed', 'train', 'eval_hash'):
    try:
        importlib.import_module(m)
    except Exception as e:  # noqa: BLE001
        missing.append(f'{m}.py ({type(e).__name__}: {e})')
if '--vocab=' not in nouns_args and not os.path.isfile(os.path.join(wordnet_dir, 'data.noun')):
    try:
        from nltk.corpus import wordnet
        wordnet.ensure_loaded()
    except Exception:  # noqa: BLE001
        missing.append(f'WordNet: no {wordnet_dir}/data.noun and no nltk wordnet data (apt-get install wordnet-base, '
                       f'WORDNET_DIR=..., or a .wordnet.tar.gz here)')
import torch
if device.startswith('cuda') and not torch.cuda.is_available():
    missing.append('a CUDA GPU (torch.cuda.is_available() is False; DEVICE=cpu for a dry run)')
for m in missing:
    print(f'gpu_check: missing {m}')
print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if
      torch.cuda.is_available() else '', f'{os.cpu_count()} CPU cores')
sys.exit(1 if missing else 0)
PY

step() {  # step NAME LIMIT COMMAND...: run it under its limit; print its wall time, GPU utilisation and memory
  local name=$1 limit=$2; shift 2
  local log="$WORK/util_$name.txt" t0 pid='' rc
  : >"$log"
  if command -v nvidia-smi >/dev/null 2>&1; then  # every 0.5 s, until the step ends
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -lms 500 >"$log" 2>/dev/null &
    pid=$!
  fi
  t0=$(date +%s.%N)
  set +e
  timeout "$limit" "$@" >"$WORK/log_$name.txt" 2>&1
  rc=$?
  set -e
  [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  grep -v '%|' "$WORK/log_$name.txt" | tail -n 4
  python3 - "$name" "$(python3 -c "import time; print(f'{time.time() - $t0:.1f}')")" "$log" "$rc" "$limit" <<'PY'
import sys
name, wall, log, rc, limit = sys.argv[1:]
rows = [[float(v) for v in line.split(',')] for line in open(log) if line.strip()[:1].isdigit()]
util = (f'gpu_util_mean={sum(r[0] for r in rows) / len(rows):.0f}% gpu_util_max={max(r[0] for r in rows):.0f}% '
        f'gpu_mem_max_gb={max(r[1] for r in rows) / 1024:.1f} samples={len(rows)}') if rows else 'gpu_util=n/a'
print(f'gpu_check step={name} wall_s={wall} {util} rc={rc}' + (f' (over its {limit} s limit)' if rc == '124' else ''))
with open(log.rsplit('/', 1)[0] + '/steps.txt', 'a') as f:
    f.write(f'{name} {wall} {rc} ' + (f'{max(r[1] for r in rows) / 1024:.2f}' if rows else 'n/a') + '\n')
PY
  return 0
}

# 2. the photos, once (reused while N_IMAGES and N_CLASSES stay)
if [ "$(cat "$WORK/photos/.made" 2>/dev/null)" != "$N_IMAGES $N_CLASSES" ]; then
  rm -rf "$WORK/photos"
  python3 - "$WORK/photos" "$N_IMAGES" "$N_CLASSES" <<'PY'
import os, sys
from concurrent.futures import ProcessPoolExecutor
sys.path.insert(0, 'benchmarks')
import bench_extract as b
folder, n, classes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
parts = max(1, min(os.cpu_count() or 1, n // 50))
with ProcessPoolExecutor(parts) as pool:  # photo i is written by part i % parts, each in its own folder
    list(pool.map(b.write_photos, [f'{folder}/p{p}' for p in range(parts)], [len(range(p, n, parts)) for p in
                  range(parts)], [500] * parts, [375] * parts, [90] * parts, range(parts), [classes] * parts))
for p in range(parts):  # one folder dataset: <class>/<part>_<image>.jpg
    for c in sorted(os.listdir(f'{folder}/p{p}')):
        os.makedirs(f'{folder}/{c}', exist_ok=True)
        for f in os.listdir(f'{folder}/p{p}/{c}'):
            os.rename(f'{folder}/p{p}/{c}/{f}', f'{folder}/{c}/p{p}_{f}')
    os.system(f'rm -rf {folder}/p{p}')
PY
  echo "$N_IMAGES $N_CLASSES" >"$WORK/photos/.made"
fi

# 3. the three steps with their defaults, then the extraction benchmarks
COMMON="--cache_dir=$WORK/cache --device=$DEVICE"
step extract "$LIMIT_EXTRACT" python3 dataset_extract.py --dataset=folder --data_path="$WORK/photos" \
  --backbone="$BACKBONE" --backbone_pretrained=random $COMMON $EXTRACT_ARGS
step nouns "$LIMIT_NOUNS" python3 nouns_embed.py --clip_model="$BACKBONE" --clip_pretrained=random \
  --wordnet_dir="$WORDNET_DIR" $COMMON $NOUNS_ARGS
step train "$LIMIT_TRAIN" python3 train.py --dataset=folder --backbone="$BACKBONE" --backbone_pretrained=random \
  --clip_model="$BACKBONE" --clip_pretrained=random --run_dir="$WORK/run" --results="$WORK/results.jsonl" $COMMON \
  $TRAIN_ARGS
step bench "$LIMIT_BENCH" python3 benchmarks/bench_extract.py --device="$DEVICE" --backbone="$BACKBONE" \
  --image_dir="$WORK/photos" --pil=false $BENCH_ARGS
step bench_cifar "$LIMIT_CIFAR" python3 benchmarks/bench_extract.py --device="$DEVICE" --backbone="$BACKBONE" \
  --image_w=32 --image_h=32 --pil=false $CIFAR_ARGS

# 4. the verdict: every step's wall time and return code, the benchmarks' ratios, the peak GPU memory
python3 - "$WORK" <<'PY'
import re, sys
work = sys.argv[1]
steps = {l.split()[0]: l.split()[1:] for l in open(f'{work}/steps.txt')}


def bench(step, key):
    lines = [l for l in open(f'{work}/log_{step}.txt', errors='replace') if l.startswith('bench_extract ')]
    m = re.search(rf'\b{key}=(\S+)', lines[-1]) if lines else None
    return m.group(1) if m else 'n/a'
mem = [float(v[2]) for v in steps.values() if v[2] != 'n/a']  # nvidia-smi's samples, else torch's own
ok = all(v[1] == '0' for v in steps.values()) and bench('bench', 'ok') == bench('bench_cifar', 'ok') == 'True'
print(f"gpu_check: extract_s={steps['extract'][0]} nouns_s={steps['nouns'][0]} train_s={steps['train'][0]} "
      f"aug_ratio={bench('bench', 'aug_ratio_steady')} plain_ratio={bench('bench', 'plain_ratio_steady')} "
      f"peak_gpu_gb={f'{max(mem):.1f}' if mem else bench('bench', 'peak_gpu_gb')} "
      f"cifar_aug_ratio={bench('bench_cifar', 'aug_ratio_steady')} ok={ok}")
sys.exit(0 if ok else 1)
PY
