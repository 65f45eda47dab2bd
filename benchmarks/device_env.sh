# Set-up on the GPU machine for what benchmarks/device_carry.py prepared (.carry/).
#   bash benchmarks/device_env.sh stage      # call 1: keep the first GGUF part in $HOME/smol
#   source benchmarks/device_env.sh          # call 2: join the parts, put .carry/site on PYTHONPATH, export SMOL_GGUF
# Call 2 fails with a clear message when the first part is gone (the machine went cold between the calls).
SMOL_DIR="$HOME/smol"
if [ "${1:-}" = "stage" ]; then
  mkdir -p "$SMOL_DIR" && cp .carry/gguf-aa "$SMOL_DIR/gguf-aa" && ls -la "$SMOL_DIR"
else
  export SMOL_GGUF="$SMOL_DIR/SmolLM2-135M-Instruct.Q4_1.gguf"
  if [ ! -s "$SMOL_GGUF" ]; then
    if [ ! -f "$SMOL_DIR/gguf-aa" ]; then
      echo "device_env.sh: $SMOL_DIR/gguf-aa is missing: the machine went cold after call 1; repeat both calls" >&2
      return 1 2>/dev/null || exit 1
    fi
    cat "$SMOL_DIR/gguf-aa" .carry/gguf-ab > "$SMOL_GGUF.partial" && mv "$SMOL_GGUF.partial" "$SMOL_GGUF"
  fi
  export PYTHONPATH="$PWD/.carry/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
fi
