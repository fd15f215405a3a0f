# safetensors load against the pinned bus copy, for mapped shares x reader threads.
python3 - <<'PY'
import torch
from safetensors.torch import save_file
t = {}
for i in range(12):
    t[f"l{i}.weight"] = torch.rand(4096, 4096); t[f"l{i}.bias"] = torch.rand(4096)
save_file(t, "/tmp/mlp768.safetensors")
PY
for th in 8; do for share in 0 55 100 0 55 100; do
  GPU_POOL_WEIGHTS_THREADS=$th GPU_POOL_WEIGHTS_SPLIT=$share timeout 60 python3 scripts/bench_standby.py load_vs_bus \
    '{"path": "/tmp/mlp768.safetensors", "device": "cuda:0", "repeats": 5}' 2>&1 | python3 -c "
import json,sys
for line in sys.stdin:
    try: r=json.loads(line)
    except Exception: print(line.rstrip()); continue
    print(f\"threads {r['threads']:>2} share {r['share']:.2f}: load {r['load_gbs']:.1f} GB/s = {r['load_gbs']/r['bus_gbs']:.2f}x bus {r['bus_gbs']:.1f} (fallbacks {r['fallbacks']}); ring alone {r['ring_gbs']:.1f}, mapped alone {r['mapped_gbs']:.1f}, read side {r['read_gbs']:.1f}, staged {r['staged_gbs']:.1f}, frees after {r['free_s']*1e3:.1f} ms\")
"
done; done
