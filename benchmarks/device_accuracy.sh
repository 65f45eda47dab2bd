# The accuracy matrix of docs/accuracy.md, as run on one H200 (after benchmarks/device_carry.py; see its docstring).
#   call 1: carry ['.carry/gguf-aa'];                                  bash benchmarks/device_env.sh stage
#   call 2: carry ['.carry/gguf-ab', '.carry/site', '.carry/bigbench']; bash benchmarks/device_accuracy.sh grid
#   call 3 (same carry, machine still warm):                           bash benchmarks/device_accuracy.sh long
# "grid": every method x seeds 0,1,2 x lr 1e-4,3e-4,1e-3 at 200 steps (repeat it with --resume until complete);
# "long": 600-step runs at the lr each method's grid chose on the select split, beside the paper's recipe (r 64,
# alpha 16, constant lr 2e-4, clip 0.3). A cold machine loses /tmp/acc: carry .carry/acc/results.jsonl then.
# Results accumulate in /tmp/acc on the machine; each call copies them to $OUT.
set -u
source benchmarks/device_env.sh || exit 1
ACC=/tmp/acc
mkdir -p "$ACC"
[ -s "$ACC/results.jsonl" ] || { [ -s .carry/acc/results.jsonl ] && cp .carry/acc/results.jsonl "$ACC/"; }
# CUDA MPS lets the workers' kernels run concurrently instead of time-sliced; without it the run still works.
export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
if ! { command -v nvidia-cuda-mps-control >/dev/null && { pgrep -f nvidia-cuda-mps >/dev/null || nvidia-cuda-mps-control -d; } &&
       timeout 60 python3 -c "import torch; torch.ones(1, device='cuda').sum().item()"; }; then
  echo "no CUDA MPS: workers are time-sliced"; echo quit | nvidia-cuda-mps-control 2>/dev/null
  unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
fi
GRID_METHODS=base,lora,lora_ptq_int4,qlora,qlora_ptq_int4,qlora_ptq_nf4,qlora_requant,qblora1,qblora2,qblora4,qblora8,qablora4x8,gradapprox
COMMON=(--gguf "$SMOL_GGUF" --data .carry/bigbench --out "$ACC" --no-save --eval-every 50 --seeds 0,1,2)
finish() { cp "$ACC/results.jsonl" "$OUT/results.jsonl"; python3 benchmarks/accuracy.py report "$ACC" --no-plots > "$OUT/report.txt" 2>&1; tail -45 "$OUT/report.txt"; }
trap finish EXIT
case "${1:-grid}" in
  grid)
    timeout "${GRID_SECONDS:-545}" python3 benchmarks/accuracy.py "${COMMON[@]}" --methods "$GRID_METHODS" \
      --lrs 1e-4,3e-4,1e-3 --time-budget "${GRID_BUDGET:-530}" --resume > "$OUT/grid.log" 2>&1 ;;
  long)  # measured: one 600-step job takes ~450-500 s with 15 jobs sharing the GPU, so give each set ~545 s
    timeout 545 python3 benchmarks/accuracy.py "${COMMON[@]}" --methods "${LONG_METHODS:-qlora,qlora_ptq_nf4,qblora2,qablora4x8}" \
      --steps 600 --lrs-from "$ACC" --parallel "${LONG_PARALLEL:-9}" --time-budget 540 --resume > "$OUT/long.log" 2>&1 &
    timeout 545 python3 benchmarks/accuracy.py "${COMMON[@]}" --methods qlora,qblora2 --recipes paper --lrs 2e-4 \
      --steps 600 --parallel "${PAPER_PARALLEL:-6}" --time-budget 540 --resume > "$OUT/paper.log" 2>&1
    wait ;;
esac
