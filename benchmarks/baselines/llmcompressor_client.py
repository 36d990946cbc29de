"""BASELINE glue, not part of curvopt: run llmcompressor_run.py in llmcompressor's own venv.

llmcompressor pins its own transformers, so it lives in a separate virtual environment; this
module (run in curvopt's environment) saves the model with ``save_pretrained`` and the
calibration token ids to a temporary folder, runs ``llmcompressor_run.py`` with that venv's
python, and loads the pruned weights back into the model.
"""

from __future__ import annotations

import pathlib
import subprocess
import tempfile

import torch
from torch import Tensor, nn

RUNNER = pathlib.Path(__file__).with_name("llmcompressor_run.py")


def prune_with_llmcompressor(
    python: str,
    model: nn.Module,
    calib: list[tuple[Tensor, Tensor]],
    method: str,
    sparsity: float,
    pattern: str | None,
) -> dict:
    """Prune ``model`` in place with llmcompressor's ``method`` (``"sparsegpt"`` or ``"wanda"``).

    Args:
        python: The python executable of a venv with llmcompressor.
        model: A transformers GPT-2 (changed in place).
        calib: ``(X, y)`` batches; the token ids ``X`` are llmcompressor's calibration samples.
        method: ``"sparsegpt"`` or ``"wanda"``.
        sparsity: Per-layer sparsity.
        pattern: ``"n:m"`` or ``None``.

    Returns:
        ``{"seconds", "peak_mib", "samples", "version"}`` as measured inside the venv.

    Raises:
        RuntimeError: The runner failed (its stderr's tail is in the message).
    """
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        model.save_pretrained(folder / "model")
        torch.save(torch.cat([X for X, _ in calib]), folder / "calib.pt")
        cmd = [python, str(RUNNER), "--model", str(folder / "model"), "--calib",
               str(folder / "calib.pt"), "--method", method, "--sparsity", str(sparsity),
               "--batch-size", str(len(calib[0][0])), "--out", str(folder / "out.pt")]  # fmt: skip
        if pattern:
            cmd += ["--pattern", pattern]
        env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "PATH": "/usr/bin:/bin", "TQDM_DISABLE": "1"}  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"llmcompressor_run.py failed:\n{done.stderr[-3000:]}")
        out = torch.load(folder / "out.pt")
    missing, unexpected = model.load_state_dict(out.pop("state_dict"), strict=False)
    if unexpected or any(not k.endswith("lm_head.weight") for k in missing):
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    return out


__all__ = ["prune_with_llmcompressor"]
