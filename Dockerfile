# mtl in a container: all-MiniLM-L6-v2 and the default data inside, CPU torch unless told otherwise.
#
#   docker build -t mtl .
#   docker run mtl                                   # python run_train.py: train on data/, then evaluate
#   docker run -v "$PWD/outputs:/app/outputs" mtl python -m mtl.predict outputs/mtl-minilm "some text"
#
# Build arguments (README.md, "Docker"):
#   TORCH_INDEX_URL  the index torch comes from. The default, PyTorch's CPU index, keeps the image small: PyPI's
#                    torch for Linux is the CUDA build and brings several GB of NVIDIA libraries. For a GPU image
#                    pass the CUDA index for the pinned version, e.g. https://download.pytorch.org/whl/cu128.
#   WHEELS           a folder in the build context to install torch from instead of any index, for machines that
#                    hold a torch wheel but cannot reach PyTorch's index, e.g. after
#                    `pip download torch==2.13.0 --no-deps -d wheels`: --build-arg WHEELS=wheels

# The build stage installs into a virtual environment that the final stage copies, so that the wheel files and
# pip's work never become layers of the image.
FROM python:3.11-slim AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG WHEELS=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /tmp/build
COPY requirements.txt ./
# COPY needs a source that exists: without WHEELS, requirements.txt stands in (pip ignores it there).
COPY ${WHEELS:-requirements.txt} wheels/
# torch first and alone (--no-deps), so that the pinned version comes from the chosen source and nowhere else;
# the second install keeps that torch (the pin matches 2.13.0+cpu too) and takes the rest, torch's own
# dependencies included, from PyPI. pip check fails the build on any conflict. torch's C++ test programs and
# headers go (about 145 MB): nothing here runs them, and the image has no compiler to build extensions with.
RUN set -eu; \
    torch="$(grep -oE '^torch==[^ ;#]+' requirements.txt)"; \
    if [ -n "$WHEELS" ]; then source="--no-index --find-links wheels"; else source="--index-url $TORCH_INDEX_URL"; fi; \
    /opt/venv/bin/pip install --no-deps $source "$torch"; \
    /opt/venv/bin/pip install --find-links wheels -r requirements.txt; \
    /opt/venv/bin/pip check; \
    rm -rf /opt/venv/lib/python3.*/site-packages/torch/test /opt/venv/lib/python3.*/site-packages/torch/include

FROM python:3.11-slim
# PYTHONPATH: `python -m mtl.predict` works from any working directory; unbuffered output reaches
# `docker logs` as it is written.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1
# A fixed numeric uid so that `runAsNonRoot` checks and volume permissions can rely on it.
RUN useradd --create-home --uid 1000 --user-group mtl
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
# The code and data stay root-owned (read-only to the user); only outputs/ (run_train.py's and run_eval.py's
# default destination) is writable. Mount a volume there to keep results: -v "$PWD/outputs:/app/outputs".
COPY data/ data/
COPY mtl/ mtl/
COPY run_train.py run_eval.py ./
RUN install -d -o mtl -g mtl outputs
USER 1000:1000
CMD ["python", "run_train.py"]
