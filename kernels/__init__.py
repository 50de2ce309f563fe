"""mamba-ft's fused Triton kernels (installed as `mamba_ft.kernels`)."""


def available() -> bool:
    """Whether the fused kernels can run here (Triton importable, kernels built in)."""
    return False
