#!/usr/bin/env bash
# On the GPU machine, from the repository root: stage the kit part that came with this call (.gpu/p<N>); once every
# part is there, check the archive's checksum, unpack it, install its wheels beside the machine's PyTorch, and run
#
#   benchmarks/gpu/run.sh stage      # only stage this call's part
#   benchmarks/gpu/run.sh accuracy   # benchmarks/accuracy.py on the full benchmark data, every system, 4 runs at once
#   benchmarks/gpu/run.sh speed      # benchmarks/speed.py on the benchmark's tweets and news, bf16, batch 256
#
# Extra arguments go to the benchmark. The kit is unpacked in KIT_DIR (default /tmp/mtl-gpu), which lasts as long as
# the machine; results and logs go to $OUT (default outputs/gpu).
set -euo pipefail
cd "$(dirname "$0")/../.."
what=${1:?usage: benchmarks/gpu/run.sh stage|accuracy|speed [benchmark arguments]}
shift
kit=${KIT_DIR:-/tmp/mtl-gpu}
out=${OUT:-outputs/gpu}
mkdir -p "$kit/parts" "$out"

# A kit is known by its checksum. A part of another kit than the one staged or unpacked here (a warm machine keeps
# /tmp between calls) starts the staging over, so that no result comes from an older kit.
carried=$(sed -n 's/^sha256=//p' .gpu/p*/manifest 2>/dev/null | head -n 1 || true)
if [[ -n $carried ]]; then
  if [[ -f $kit/ready && $(cat "$kit/ready") != "$carried" ]]; then
    echo "a different kit came with this call: unpacking it instead of the one in $kit"
    rm -rf "$kit" && mkdir -p "$kit/parts"
  elif [[ -f $kit/parts/manifest && $(sed -n 's/^sha256=//p' "$kit/parts/manifest") != "$carried" ]]; then
    echo "this part belongs to a different kit than the parts staged in $kit: staging starts over"
    rm -rf "$kit/parts" && mkdir -p "$kit/parts"
  fi
fi

unpack() {
  shopt -s nullglob
  for dir in .gpu/p*/; do cp "$dir"part? "$dir"manifest "$kit/parts/"; done
  if [[ ! -f "$kit/parts/manifest" ]]; then
    echo "error: no kit part came with this call: carry .gpu/p0, then .gpu/p1, ... (made by benchmarks/gpu/pack.sh)" >&2
    exit 1
  fi
  local parts sha256 staged
  parts=$(sed -n 's/^parts=//p' "$kit/parts/manifest")
  sha256=$(sed -n 's/^sha256=//p' "$kit/parts/manifest")
  staged=("$kit"/parts/part?)
  if (( ${#staged[@]} < parts )); then
    echo "staged ${#staged[@]} of $parts kit parts in $kit; call again with the next one"
    [[ $what == stage ]] && exit 0
    echo "error: the kit is incomplete, so '$what' cannot run yet" >&2
    exit 1
  fi
  if [[ $(cat "${staged[@]}" | sha256sum | cut -d' ' -f1) != "$sha256" ]]; then
    echo "error: the kit's checksum does not match its manifest; pack it again with benchmarks/gpu/pack.sh" >&2
    exit 1
  fi
  cat "${staged[@]}" | tar -xz -C "$kit"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$kit/site" \
    "$kit"/wheels/*.whl
  rm -rf "$kit/parts" "$kit/wheels"
  echo "$sha256" > "$kit/ready"
}

[[ -f "$kit/ready" ]] || unpack
export PYTHONPATH="$kit/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
python3 -c "import torch, transformers, datasets; print('torch', torch.__version__, '|', torch.cuda.get_device_name(0)
if torch.cuda.is_available() else 'no GPU', '| transformers', transformers.__version__, '| datasets', datasets.__version__)"

start=$SECONDS
case $what in
  stage) ;;
  accuracy)
    # --jobs 4: the four trainings at once (each logs to its own run_train.log, copied to $out afterwards)
    runs=/tmp/mtl-bench-accuracy
    rm -rf "$runs"  # no log of an earlier call is copied as if it were this one's
    python3 benchmarks/accuracy.py --data_dir "$kit/bench" --model_name_or_path "$kit/model" --jobs 4 \
      --output_dir "$runs" --results_file "$out/RESULTS.md" "$@" 2>&1 | tee "$out/accuracy.log" || status=$?
    for log in "$runs"/*/run_train.log; do
      [[ -f $log ]] && cp "$log" "$out/run_train-$(basename "$(dirname "$log")").log"
    done
    (( ${status:-0} == 0 )) || exit "$status" ;;
  speed)
    python3 benchmarks/speed.py --model_name_or_path "$kit/model" --data_file "$kit/bench/train.jsonl" \
      --bf16 --batch_size 256 --results_file "$out/RESULTS.md" "$@" 2>&1 | tee "$out/speed.log" ;;
  *) echo "error: unknown '$what'; use stage, accuracy or speed" >&2; exit 1 ;;
esac
[[ $what == stage ]] || echo "$what: $((SECONDS - start)) s wall time (unpacking the kit excluded)" | tee -a "$out/$what.log"
