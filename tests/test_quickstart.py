"""The quickstart: `train.py` with no recipe trains on scikit-learn's digits and reports kNN before/after."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dinov2_hf.data.decode import open_rgb
from dinov2_hf.data.sources import DataSettings, builtin_digits, load_image_stream

ROOT = Path(__file__).resolve().parents[1]


def test_builtin_digits_source(tmp_path):
    from sklearn.datasets import load_digits

    folder = builtin_digits(tmp_path / "digits")
    assert builtin_digits(tmp_path / "digits") == folder  # written once
    rows = list(load_image_stream(DataSettings(source=str(folder), label_column="label", shuffle_buffer=0)))
    digits = load_digits()
    assert [r["label"] for r in rows] == digits.target.tolist()
    image = open_rgb(rows[0]["image"]["bytes"])
    assert image.size == (32, 32) and image.mode == "RGB"
    # The upscaled image, averaged back to 8x8, follows the original digit.
    small = np.asarray(image.convert("L"), dtype=float).reshape(8, 4, 8, 4).mean(axis=(1, 3))
    assert np.corrcoef(small.ravel(), digits.images[0].ravel())[0, 1] > 0.9


@pytest.mark.slow
def test_train_py_without_arguments_runs_the_quickstart(tmp_path):
    """README's main job, `accelerate launch train.py`, shortened to 6 steps."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home")}
    launcher = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    overrides = ["train.max_steps=6", "monitor.every=3", "monitor.train_images=200", "monitor.test_images=100"]
    result = subprocess.run([launcher, "launch", str(ROOT / "train.py"), *overrides], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dinov2_hf train: 1 process on cpu, mixed precision no; 6 steps -> outputs/quickstart" in result.stdout
    match = re.search(r"kNN top-1 \(k=20\) on sklearn:digits: ([\d.]+)% at initialisation -> ([\d.]+)% exported", result.stdout)
    assert match, result.stdout
    assert 0 < float(match.group(1)) <= 100 and 0 < float(match.group(2)) <= 100
    assert (tmp_path / "outputs" / "quickstart" / "export" / "transformers" / "model.safetensors").is_file()
    assert (tmp_path / "hf_home" / "dinov2_hf" / "sklearn_digits" / "train-00000-of-00001.parquet").is_file()
