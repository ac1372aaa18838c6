import os

# Tests never reach the Hub: models are built from random weights and data is local.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


# Modules whose module-scoped fixture starts processes: one xdist worker runs each whole, so the fixture runs once.
# (xdist's own xdist_group marks are ignored under pytest 9: pytest-xdist issue 1386.)
MODULES_ON_ONE_WORKER = ("tests/test_distributed_training.py", "tests/test_data_parallel_step.py")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``-n``: each test its own work unit (as xdist's default), except the modules above, one unit each; units go
    out in collection order (below: slow tests first), the multi-test modules ahead of them."""
    from xdist.scheduler import LoadScopeScheduling

    class ModulesTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if module in MODULES_ON_ONE_WORKER else nodeid

    return ModulesTogether(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow tests first (stable order otherwise): on two xdist workers the long ones overlap at the start instead
    of one of them running alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


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
