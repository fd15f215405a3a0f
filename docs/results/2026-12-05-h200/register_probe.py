"""Probe: can parallel cudaHostRegister of the mapped page cache beat the ring?"""
import ctypes, mmap, os, statistics, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
import torch
sys.path.insert(0, os.getcwd())
from workers import weights

PATH = "/tmp/mlp768.safetensors"
if not os.path.exists(PATH):
    from safetensors.torch import save_file
    t = {}
    for i in range(12):
        t[f"l{i}.weight"] = torch.rand(4096, 4096); t[f"l{i}.bias"] = torch.rand(4096)
    save_file(t, PATH)
with open(PATH, "rb") as f:
    while f.read(64 << 20):
        pass
dev = torch.device("cuda:0")
a = torch.randn(256, 256, device=dev); (a @ a).sum().item()
size = os.path.getsize(PATH)
print("file", size >> 20, "MiB", flush=True)

def libcudart():
    for line in open("/proc/self/maps"):
        p = line.split()[-1]
        if "libcudart.so" in p:
            return ctypes.CDLL(p)
    raise SystemExit("no libcudart mapped")
rt = libcudart()
rt.cudaHostRegister.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
rt.cudaHostUnregister.argtypes = [ctypes.c_void_p]
RO = 0x08

def med(fn, n=5):
    ts = []
    for _ in range(n):
        torch.cuda.synchronize(); s = time.perf_counter(); fn(); torch.cuda.synchronize(); ts.append(time.perf_counter() - s)
    return statistics.median(ts)

pin = torch.empty(size, dtype=torch.uint8, pin_memory=True); pin.fill_(1)
dst = torch.empty(size, dtype=torch.uint8, device=dev)
bus = med(lambda: dst.copy_(pin, non_blocking=True))
gb = lambda t: size / t / 1e9
print(f"bus pinned->device: {gb(bus):.1f} GB/s", flush=True)

for th in (1, 4, 8, 16):
    torch.set_num_threads(th)
    src = torch.empty(size, dtype=torch.uint8, pin_memory=True); src.fill_(2)
    t = med(lambda: pin.copy_(src))
    print(f"host memcpy pinned->pinned, torch {th} threads: {gb(t):.1f} GB/s", flush=True)
    del src
torch.set_num_threads(os.cpu_count() or 8)

def ring():
    out = weights.load_file(PATH, dev)
    del out
t = med(ring)
print(f"ring load (default {weights.READ_THREADS}x{weights.CHUNK_BYTES>>20}MiB): {gb(t):.1f} GB/s = {bus/t:.2f}x bus", flush=True)
os.environ.pop("GPU_POOL_WEIGHTS_PATH", None)
def mapped_serial():
    out = weights.load_file(PATH, dev, mapped=True); del out
t = med(mapped_serial)
print(f"mapped serial (incl unregister): {gb(t):.1f} GB/s = {bus/t:.2f}x", flush=True)

PAGE = mmap.PAGESIZE
def parallel(threads, chunk_mib, populate, copy=True, unreg_after=True):
    fd = os.open(PATH, os.O_RDONLY)
    flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0x8000) if populate else 0)
    t0 = time.perf_counter()
    mm = mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        view = torch.frombuffer(mm, dtype=torch.uint8)
    addr = view.data_ptr()
    ch = chunk_mib << 20
    ranges = [(o, min(size, o + ch)) for o in range(0, size, ch)]
    def reg(r):
        e = rt.cudaHostRegister(addr + r[0], r[1] - r[0], RO)
        if e: raise RuntimeError(f"register error {e}")
        return r
    stream = torch.cuda.current_stream(dev)
    t1 = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        futs = [ex.submit(reg, r) for r in ranges]
        for f in futs:
            a_, b_ = f.result()
            if copy:
                dst[a_:b_].copy_(view[a_:b_], non_blocking=True)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        if unreg_after:
            list(ex.map(lambda r: rt.cudaHostUnregister(addr + r[0]), ranges))
    t3 = time.perf_counter()
    if not unreg_after:
        for r in ranges: rt.cudaHostUnregister(addr + r[0])
    del view; mm.close(); os.close(fd)
    return t2 - t0, t3 - t2, t1 - t0

for populate in (False, True):
    for th in (1, 4, 8, 16):
        for cm in (8, 32, 64):
            rs = [parallel(th, cm, populate) for _ in range(4)]
            load = statistics.median(r[0] for r in rs); un = statistics.median(r[1] for r in rs); mp = statistics.median(r[2] for r in rs)
            print(f"parallel register {th:>2}x{cm:>2}MiB populate={populate}: load {gb(load):.1f} GB/s = {bus/load:.2f}x bus (mmap {mp*1e3:.1f} ms; unregister after {un*1e3:.1f} ms)", flush=True)
# registration alone (no copy) at 16x32
rs = [parallel(16, 32, False, copy=False) for _ in range(3)]
print(f"register only 16x32: {gb(statistics.median(r[0] for r in rs)):.1f} GB/s", flush=True)
rs = [parallel(1, 768, False, copy=False) for _ in range(3)]
print(f"register only 1x768 one call: {gb(statistics.median(r[0] for r in rs)):.1f} GB/s", flush=True)
