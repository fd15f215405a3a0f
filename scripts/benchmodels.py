"""Models the bench writes into its temp directory (torch is imported here, CPU only)."""

from __future__ import annotations

import os

import torch

from workers.manifest import InputSpec, write_manifest

# The model of ../shared/baselines/gpu_anchor.py make: 12 x (Linear(4096, 4096) + ReLU),
# 768 MiB of float32 weights. Written here with the same shapes (that directory does not
# travel to the GPU machine).
MLP_HIDDEN, MLP_LAYERS = 4096, 12
MLP_WARM_BATCHES = (1, 64, 512)  # what the baseline's warm-up runs

FACTORY_SOURCE = '''\
"""Written by scripts/benchmodels.py: the gpu_anchor MLP, built for the safetensors format."""
import torch

HIDDEN, LAYERS = {hidden}, {layers}


def build() -> torch.nn.Sequential:
    layers = []
    for _ in range(LAYERS):
        layers += [torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers)
'''


class Identity(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def make_identity(path: str) -> str:
    """TorchScript ``forward(x) -> x``: the router and big-tensor benches' tiny model."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.jit.script(Identity()).save(path)
    return path


def mlp(seed: int, hidden: int, layers: int) -> torch.nn.Sequential:
    gen = torch.Generator().manual_seed(seed)
    blocks: list[torch.nn.Module] = []
    with torch.no_grad():
        for _ in range(layers):
            with torch.device("meta"):  # skip the default init over 768 MiB
                lin = torch.nn.Linear(hidden, hidden)
            lin = lin.to_empty(device="cpu")
            lin.weight.uniform_(-(hidden**-0.5), hidden**-0.5, generator=gen)
            lin.bias.uniform_(-(hidden**-0.5), hidden**-0.5, generator=gen)
            blocks += [lin, torch.nn.ReLU()]
    return torch.nn.Sequential(*blocks).eval()


def make_mlp_versions(directory: str, versions: int, hidden: int = MLP_HIDDEN,
                      layers: int = MLP_LAYERS) -> list[str]:
    """``v0.pt``, ``v1.pt``...: distinct weights, same shapes; a manifest beside each so
    that a pool worker warms up as the baseline did (batches of 1, 64 and 512)."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for v in range(versions):
        path = os.path.join(directory, f"v{v}.pt")
        if not os.path.exists(path):
            torch.jit.script(mlp(v, hidden, layers)).save(path + ".tmp")
            os.replace(path + ".tmp", path)
        write_manifest(os.path.join(directory, f"v{v}.toml"),
                       inputs=[InputSpec("float32", (1, hidden))],
                       warmup_batch_sizes=MLP_WARM_BATCHES)
        paths.append(path)
    return paths


def make_factory_copy(pt_path: str, directory: str, hidden: int, layers: int) -> str:
    """The same weights as ``pt_path`` in workers.loader's factory format:
    ``net.py`` + ``model.safetensors`` + ``model.toml`` (factory = "net.py:build")."""
    import safetensors.torch

    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "net.py"), "w") as f:
        f.write(FACTORY_SOURCE.format(hidden=hidden, layers=layers))
    path = os.path.join(directory, "model.safetensors")
    if not os.path.exists(path):
        state = {k: v.contiguous() for k, v in torch.jit.load(pt_path).state_dict().items()}
        safetensors.torch.save_file(state, path + ".tmp")
        os.replace(path + ".tmp", path)
    write_manifest(os.path.join(directory, "model.toml"), factory="net.py:build")
    return path


def make_image_model(path: str, *, resnet: bool, half: bool, image: int) -> str:
    """torchvision resnet50 (random weights: nothing is downloaded), scripted; or, for a
    CPU dry run, a small CNN. Manifest: one [1, 3, image, image] input, warm-up 1 and 64."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if resnet:
        import torchvision

        model: torch.nn.Module = torchvision.models.resnet50(weights=None)
    else:
        model = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, stride=2), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10))
    model = model.eval()
    if half:
        model = model.half()
    torch.jit.script(model).save(path)
    write_manifest(os.path.splitext(path)[0] + ".toml",
                   inputs=[InputSpec("float16" if half else "float32", (1, 3, image, image))],
                   warmup_batch_sizes=(1, 64))
    return path
