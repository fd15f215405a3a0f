#!/usr/bin/env bash
# safetensors load against the pinned bus copy, for reader threads x chunk MiB pairs.
out=$1
python3 - <<'PY'
import torch
from safetensors.torch import save_file
t = {}
for i in range(12):
    t[f"l{i}.weight"] = torch.rand(4096, 4096); t[f"l{i}.bias"] = torch.rand(4096)
save_file(t, "/tmp/mlp768.safetensors")
PY
for pair in 8x8 12x8 16x8 12x4 16x4 12x16 16x16; do
  th=${pair%x*}; ch=${pair#*x}
  GPU_POOL_WEIGHTS_THREADS=$th GPU_POOL_WEIGHTS_CHUNK_MB=$ch timeout 60 python3 scripts/bench_standby.py load_vs_bus \
    '{"path": "/tmp/mlp768.safetensors", "device": "cuda:0", "repeats": 5}' 2>&1 | python3 -c "
import json,sys
for line in sys.stdin:
    try: r=json.loads(line)
    except Exception: print(line.rstrip()); continue
    print(f\"threads {r['threads']:>2} chunk {r['chunk_mib']:>2} MiB: load {r['load_gbs']:.1f} GB/s, read side {r['read_gbs']:.1f}, staged {r['staged_gbs']:.1f}, bus {r['bus_gbs']:.1f}: load/bus {r['load_gbs']/r['bus_gbs']:.2f}x\")
"
done | tee $out/bus.log
