import sys
from pathlib import Path


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", help="cpu or cuda")


def pytest_benchmark_update_machine_info(config, machine_info):
    # pytest-benchmark names the CPU only: add the GPU, the library versions and torch's SDPA kernel choice
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_probe import gpu_info, versions

    dev = torch.device(config.getoption("--device"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        return
    machine_info["attnscope"] = {**gpu_info(dev), "versions": versions()}
