"""benchmarks/gpu_check.py on a machine without a GPU: it says so and succeeds, measuring nothing."""

import importlib.util

from conftest import ROOT


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    return gpu_check


def test_gpu_check_without_a_gpu_says_so_and_exits_0(monkeypatch, capsys):
    gpu_check = load_gpu_check()
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 0
    assert "No CUDA GPU: nothing measured" in capsys.readouterr().out


def test_gpu_check_names_the_peak_it_divides_by():
    gpu_check = load_gpu_check()
    assert gpu_check.dense_peak("NVIDIA H100 80GB HBM3") == 989.4e12
    assert gpu_check.dense_peak("NVIDIA H100 PCIe") == 756e12
    assert gpu_check.dense_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_check.dense_peak("Tesla T4") is None
