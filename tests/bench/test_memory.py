import pytest
import torch

from curvopt.bench.memory import PeakMemory, current_rss_bytes


@pytest.mark.skipif(current_rss_bytes() is None, reason="no /proc/self/statm on this system")
def test_peak_memory_sees_a_large_temporary():
    size = 64 * 2**20
    with PeakMemory(interval=1e-4) as mem:
        x = torch.ones(size // 8, dtype=torch.float64)  # written, so the pages are resident
        for _ in range(20):  # hold it while the sampler runs
            x.mul_(1.0)
        del x
    assert mem.cpu_bytes >= 0.8 * size
    assert mem.cuda_bytes is None


def test_peak_memory_rejects_bad_interval():
    with pytest.raises(ValueError):
        PeakMemory(interval=0)
