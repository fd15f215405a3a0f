python3 - <<'PY'
import torch
from safetensors.torch import save_file
t = {}
for i in range(12):
    t[f"l{i}.weight"] = torch.rand(4096, 4096); t[f"l{i}.bias"] = torch.rand(4096)
save_file(t, "/tmp/mlp768.safetensors")
PY
for r in 0 1 0 1; do for path in ring split; do
  GPU_POOL_WEIGHTS_RESERVE=$r GPU_POOL_WEIGHTS_PATH=$path timeout 60 python3 scripts/bench_standby.py load_vs_bus \
    '{"path": "/tmp/mlp768.safetensors", "device": "cuda:0", "repeats": 5}' 2>&1 | python3 -c "
import json,sys
for line in sys.stdin:
    try: r=json.loads(line)
    except Exception: print(line.rstrip()); continue
    print(f\"reserve $r path $path: load {r['load_gbs']:.1f} GB/s = {r['load_gbs']/r['bus_gbs']:.2f}x bus {r['bus_gbs']:.1f}; loads ms {[round(x*1e3,1) for x in r['loads']]}\")
"
done; done
