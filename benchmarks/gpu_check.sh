#!/usr/bin/env bash
# The GPU check of the main job (under 5 minutes on one H200 with 16 cores), with nothing but this
# project and its requirements: generated photos in a folder dataset, random weights (compute does
# not depend on them), the three steps end to end with their defaults (120 views, fp16 on the GPU),
# then benchmarks/bench_extract.py on the GPU. Prints each step's wall time and the GPU's
# utilisation sampled every 0.5 s (mean and max). Run from the repository root:
#
#   bash benchmarks/gpu_check.sh                        # WordNet from /usr/share/wordnet or nltk's data
#   WORDNET_DIR=/path/to/wordnet bash benchmarks/gpu_check.sh
#
# Wheels in .whl/ (python packages the machine lacks) are installed into /tmp/site first, and a
# WordNet archive .wordnet.tar.gz (of /usr/share/wordnet) is unpacked, when they are there.
# Sizes: N_IMAGES photos in N_CLASSES classes (the folder split draws 20 train and 10 query images
# a class: 20 classes give the 400-image train split), DEVICE=cpu and small sizes dry-run it.
set -euo pipefail
cd "$(dirname "$0")/.."
N_IMAGES=${N_IMAGES:-1000}
N_CLASSES=${N_CLASSES:-20}
DEVICE=${DEVICE:-cuda}
BACKBONE=${BACKBONE:-ViT-B-16}
BENCH_ARGS=${BENCH_ARGS:---n_images=1000 --views=4 --batch_size=256 --rounds=2 --full_views=120 --full_images=1000}
WORK=${WORK:-/tmp/gpu_check}
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
rm -rf "$WORK" && mkdir -p "$WORK"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, \
'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"

step() {  # step NAME COMMAND...: run it, print its wall time and the GPU utilisation meanwhile
  local name=$1; shift
  local log="$WORK/util_$name.txt" t0 pid=''
  : >"$log"
  if command -v nvidia-smi >/dev/null 2>&1; then  # utilisation every 0.5 s, until the step ends
    nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 500 >"$log" 2>/dev/null &
    pid=$!
  fi
  t0=$(date +%s.%N)
  set +e
  "$@" >"$WORK/log_$name.txt" 2>&1
  local rc=$?
  set -e
  grep -v '%|' "$WORK/log_$name.txt" | tail -n 6
  local wall
  wall=$(python3 -c "import time; print(f'{time.time() - $t0:.1f}')")
  [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  python3 - "$name" "$wall" "$log" "$rc" <<'PY'
import sys
name, wall, log, rc = sys.argv[1:]
u = [float(x) for x in open(log).read().split() if x.replace('.', '', 1).isdigit()]
util = f'gpu_util_mean={sum(u) / len(u):.0f}% gpu_util_max={max(u):.0f}% samples={len(u)}' if u else 'gpu_util=n/a'
print(f'gpu_check step={name} wall_s={wall} {util} rc={rc}')
PY
  return "$rc"
}

python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import bench_extract as b; \
b.write_photos('$WORK/photos', $N_IMAGES, 500, 375, 90, 0, classes=$N_CLASSES)"
COMMON="--cache_dir=$WORK/cache --device=$DEVICE"
step extract python3 dataset_extract.py --dataset=folder --data_path="$WORK/photos" --backbone="$BACKBONE" \
  --backbone_pretrained=random $COMMON
step nouns python3 nouns_embed.py --clip_model="$BACKBONE" --clip_pretrained=random --wordnet_dir="$WORDNET_DIR" $COMMON
step train python3 train.py --dataset=folder --backbone="$BACKBONE" --backbone_pretrained=random \
  --clip_model="$BACKBONE" --clip_pretrained=random --run_dir="$WORK/run" --results="$WORK/results.jsonl" $COMMON
step bench_extract python3 benchmarks/bench_extract.py --device="$DEVICE" --backbone="$BACKBONE" $BENCH_ARGS
