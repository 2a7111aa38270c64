import pytest
import torch

from libpipe.errors import ConfigError
from libpipe.model import KVCachePool, load_span, resolve_device, resolve_dtype


def test_cpu_defaults_and_allowed_dtypes():
    cpu = resolve_device("cpu")
    assert resolve_dtype(cpu) == torch.float32
    assert resolve_dtype(cpu, "bf16") == torch.bfloat16
    assert resolve_dtype(cpu, torch.float32) == torch.float32
    with pytest.raises(ConfigError, match="float16 is not supported on cpu"):
        resolve_dtype(cpu, "fp16")
    with pytest.raises(ConfigError, match="unknown dtype"):
        resolve_dtype(cpu, "int8")


@pytest.mark.parametrize("text", ["gpu", "cuda:", "cuda:x", "CPU", "mps:0", ""])
def test_unknown_device_strings(text):
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_device(text)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
@pytest.mark.parametrize("text", ["cuda", "cuda:1"])
def test_cuda_without_cuda_is_a_clear_error(text):
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device(text)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_defaults_to_fp16():
    dev = resolve_device("cuda:0")
    assert resolve_dtype(dev) == torch.float16
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_span_on_cuda_in_fp16_tracks_cpu_fp32(checkpoints):
    cpu = load_span(checkpoints["llama-gqa"], 0, 8, progress=False)
    gpu = load_span(checkpoints["llama-gqa"], 0, 8, device="cuda", progress=False)
    assert gpu.dtype == torch.float16 and gpu.device == torch.device("cuda:0")
    x = torch.randn(2, 24, 64)
    reference = cpu(x)
    pool = KVCachePool(1 << 26, device="cuda")
    with gpu.open_session(pool, batch=2, max_length=32) as s:
        prefill = s.step(x[:, :23].to("cuda", torch.float16))
        (last,) = gpu.decode_batch([s], [x[:, 23:].to("cuda", torch.float16)])
    got = torch.cat([prefill, last], dim=1).float().cpu()
    torch.testing.assert_close(got, reference, atol=0.1, rtol=0.02)
