"""The Docker image: build it, then train, predict and evaluate inside one container run, without network.

Uses Docker where an engine answers; otherwise podman as set up by ../shared/tools/offline-python-base.sh (root,
Debian), which also provides a local python:3.11-slim base. The image stays in the engine's store so that the next
build reuses its layers (cold: minutes; cached: seconds). Where pip can copy the pinned torch out of a local wheel
folder without any index, the build installs that wheel (--build-arg WHEELS=wheels) instead of downloading one.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mtl import MultiTaskConfig

pytestmark = [pytest.mark.container, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
BASE_SCRIPT = ROOT.parent / "shared" / "tools" / "offline-python-base.sh"
IMAGE = "mtl:container-test"
TEXTS = ("The new phone's battery is fantastic.", "The senate passed the tax law today.")

# One container run: who runs it, training on a small budget into the image's writable outputs/, then the predict
# and evaluation entry points on the model it wrote. "@@name" ... "@@done" frame what the test parses.
SCRIPT = f"""set -eu
echo "@@user $(id -u) $(id -un)"
python run_train.py --max_train_samples 64 --max_eval_samples 32 --num_train_epochs 1 \\
    --per_device_train_batch_size 16 --output_dir outputs/smoke --disable_tqdm true
echo @@test_results; cat outputs/smoke/test_results.json; echo; echo @@done
echo @@predict; python -m mtl.predict outputs/smoke {shlex.join(TEXTS)}; echo @@done
python run_eval.py --model_name_or_path outputs/smoke --test_file data/validation.jsonl --output_dir outputs/eval
echo @@eval_results; cat outputs/eval/eval_results.json; echo; echo @@done
"""


def sh(command: list[str], env: dict | None = None, timeout: int = 1800) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, env=env, cwd=ROOT, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=timeout
    )


def tail(result: subprocess.CompletedProcess, lines: int = 60) -> str:
    return "\n".join((result.stdout + result.stderr).splitlines()[-lines:])


def answers(engine: str) -> bool:
    return shutil.which(engine) is not None and sh([engine, "info"], timeout=60).returncode == 0


def container_engine() -> tuple[list[str], dict, list[str]]:
    """(command prefix, environment, extra build flags) of an engine that can run a container; otherwise skip."""
    if answers("docker"):
        return ["docker"], dict(os.environ), []
    if not BASE_SCRIPT.is_file():
        # Without the script there is no offline base image: plain podman only works where it can find one.
        if answers("podman") and sh(["podman", "image", "exists", "python:3.11-slim"], timeout=60).returncode == 0:
            return ["podman"], dict(os.environ), []
        pytest.skip(f"no Docker engine, and no {BASE_SCRIPT} to set up podman with a local python:3.11-slim")
    setup = sh(["sh", str(BASE_SCRIPT)], timeout=900)
    if setup.returncode != 0:
        pytest.skip(f"podman could not be installed or set up by {BASE_SCRIPT}:\n{tail(setup, 20)}")
    # It prints the prefix to use, e.g. "CONTAINERS_CONF=/var/tmp/.../containers.conf podman --root ... --runroot ...".
    words = setup.stdout.strip().splitlines()[-1].split()
    settings = [word for word in words if re.fullmatch(r"[A-Z_]+=.*", word)]
    env = dict(os.environ, **dict(word.split("=", 1) for word in settings))
    engine = [word for word in words if word not in settings]
    probe = sh([*engine, "run", "--rm", "--network", "none", "python:3.11-slim", "true"], env=env, timeout=300)
    if probe.returncode != 0:
        pytest.skip(f"podman is installed but cannot run a container here:\n{tail(probe, 20)}")
    # Its python:3.11-slim is local and there is no registry to pull from.
    return engine, env, ["--pull=never"]


def local_torch_wheel() -> list[str]:
    """--build-arg WHEELS=wheels if pip copies the pinned torch into wheels/ from a local folder (no index)."""
    pin = re.search(r"^torch==[^\s;#]+", (ROOT / "requirements.txt").read_text(), re.MULTILINE).group()
    download = [sys.executable, "-m", "pip", "download", pin, "--no-deps", "--no-index", "--python-version", "3.11"]
    ok = sh([*download, "--dest", str(ROOT / "wheels"), "--quiet"], timeout=300).returncode == 0
    return ["--build-arg", "WHEELS=wheels"] if ok else []


def section(stdout: str, name: str) -> str:
    return stdout.split(f"@@{name}\n", 1)[1].split("@@done", 1)[0]


def test_image_trains_predicts_and_evaluates_offline_as_non_root():
    engine, env, build_flags = container_engine()
    build = sh([*engine, "build", *build_flags, *local_torch_wheel(), "-t", IMAGE, "."], env=env)
    assert build.returncode == 0, f"the image build failed:\n{tail(build)}"

    # `docker run mtl` with no command trains on the default data and evaluates.
    inspect = sh([*engine, "image", "inspect", "--format", "{{json .Config.Cmd}}", IMAGE], env=env, timeout=60)
    assert json.loads(inspect.stdout) == ["python", "run_train.py"]

    # No network: the encoder weights and the data must be inside the image.
    run = sh([*engine, "run", "--rm", "--network", "none", IMAGE, "sh", "-c", SCRIPT], env=env, timeout=900)
    assert run.returncode == 0, f"the container run failed:\n{tail(run)}"
    output = run.stdout + run.stderr

    uid, user = re.search(r"^@@user (\d+) (\S+)$", run.stdout, re.MULTILINE).groups()
    assert uid != "0" and user != "root", f"the container runs as {user} (uid {uid})"

    tasks = MultiTaskConfig().tasks
    test_results = json.loads(section(run.stdout, "test_results"))
    for task in tasks:
        assert 0.0 <= test_results[f"test_{task}_accuracy"] <= 1.0, test_results
        assert f"test_{task}_accuracy" in output, "the test metrics were written but not printed"

    predictions = [json.loads(line) for line in section(run.stdout, "predict").splitlines() if line.strip()]
    assert [prediction["text"] for prediction in predictions] == list(TEXTS)
    for prediction in predictions:
        for task, labels in tasks.items():
            assert prediction[task] in labels, prediction
            assert 0.0 < prediction[f"{task}_score"] <= 1.0, prediction

    eval_results = json.loads(section(run.stdout, "eval_results"))
    for task in tasks:
        assert 0.0 <= eval_results[f"{task}_accuracy"] <= 1.0, eval_results
