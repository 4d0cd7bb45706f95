"""`pip install .` gives an importable `mtl` and a working `python -m mtl.predict` outside the checkout."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_installed_package_works_outside_the_checkout(tmp_path, tiny_model, tiny_tokenizer):
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(ROOT)],
        check=True,
        cwd=tmp_path,
        timeout=300,
    )
    (wheel,) = wheels.glob("mtl-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, timeout=300)
    model_dir = tmp_path / "model"
    tiny_model.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)

    # Dependencies come from this environment; mtl only from the installed wheel (the checkout is not on the path).
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    where = subprocess.run(
        [sys.executable, "-c", "import mtl; print(mtl.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(where.stdout.strip()).is_relative_to(site)
    completed = subprocess.run(
        [sys.executable, "-m", "mtl.predict", str(model_dir), "the new phone is great", "the vote was awful"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    lines = [json.loads(line) for line in completed.stdout.splitlines()]
    assert [line["text"] for line in lines] == ["the new phone is great", "the vote was awful"]
    assert all(line["category"] in ("Tech", "Sports", "Politics") for line in lines)
    assert all(0.0 < line["sentiment_score"] <= 1.0 for line in lines)
