import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


def pytest_report_header(config):
    import cm3leon_kernels

    return (f"torch {torch.__version__}; cm3leon_kernels cuda_built={cm3leon_kernels.cuda_built()} "
            f"cpu_features={cm3leon_kernels.cpu_features()}; cuda available={torch.cuda.is_available()}")
