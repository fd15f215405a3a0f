"""Where torch.jit.load's time goes for 768 MiB (12 x Linear(4096)) on this host."""
import os, sys, time, zlib, subprocess, json
import torch
p = "/tmp/probe_big.pt"
if not os.path.exists(p):
    m = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(4096, 4096), torch.nn.ReLU()) for _ in range(12)])
    torch.jit.save(torch.jit.script(m), p)
mode = sys.argv[1] if len(sys.argv) > 1 else "parent"
def t(fn, n=3):
    out = []
    for _ in range(n):
        s = time.perf_counter(); fn(); out.append(time.perf_counter() - s)
    return " ".join(f"{x:.3f}" for x in out)
if mode == "parent":
    print("glibc", os.confstr("CS_GNU_LIBC_VERSION"))
    for f in ("enabled", "defrag"):
        try: print("thp", f, open(f"/sys/kernel/mm/transparent_hugepage/{f}").read().strip())
        except OSError as e: print("thp", f, e)
    size = os.path.getsize(p)
    data = open(p, "rb").read()
    print("size MB", size >> 20)
    print("read (page cache)", t(lambda: open(p, "rb").read()))
    print("zlib.crc32", t(lambda: zlib.crc32(data)))
    print("bytearray copy", t(lambda: bytearray(data)))
    r = torch._C.PyTorchFileReader(p)
    names = r.get_all_records()
    print("get_record all", t(lambda: [r.get_record(k) for k in names]))
    for env in ({}, {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=4294967296"}):
        for dev in ("cpu", "cuda"):
            out = subprocess.run([sys.executable, __file__, dev], env=dict(os.environ, **env), capture_output=True, text=True)
            print(env or "default env", dev, out.stdout.strip(), out.stderr.strip()[-300:])
else:
    if mode == "cuda":
        torch.cuda.init(); torch.empty(1, device="cuda"); torch.cuda.synchronize()
    def load():
        m = torch.jit.load(p, map_location=mode)
        if mode == "cuda": torch.cuda.synchronize()
    print("jit.load", t(load))
    r = torch._C.PyTorchFileReader(p)
    names = r.get_all_records()
    print("| get_record all", t(lambda: [r.get_record(k) for k in names]))
