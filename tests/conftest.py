import os

# Tests never reach the Hub: models are built from random weights and data is local.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def randomize_(model: torch.nn.Module, std: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """Give every parameter random values (LayerScale and norms included), so no branch is a no-op."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return model


@pytest.fixture
def tiny_kwargs():
    """A small architecture with the real patch size, so 224/518 inputs keep the real grids."""
    return dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=224, patch_size=14, layerscale_value=0.5)


# ../shared/data/cifar10 beside the checkout, or DINOV2_HF_CIFAR10 to point elsewhere.
SHARED_CIFAR = __import__("pathlib").Path(
    os.environ.get("DINOV2_HF_CIFAR10", __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10")
)


@pytest.fixture(scope="session")
def cifar_dir():
    """The CIFAR-10 parquet shards; a missing copy fails under CI=true and skips elsewhere."""
    if not (SHARED_CIFAR / "test-00000-of-00001.parquet").is_file():
        message = f"CIFAR-10 parquet shards not found in {SHARED_CIFAR}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return SHARED_CIFAR
