# The image of every pod in deploy/: the Ray head and GPU workers (raycluster.yaml) and the MLflow
# server (mlflow.yaml). Build it from the repository root and push it under the name and tag that
# deploy/kustomization.yaml's `images:` gives (the tag is pyproject.toml's version):
#   docker build -t ghcr.io/erase-project/erase:0.1.0 . && docker push ghcr.io/erase-project/erase:0.1.0
#
# Ray's GPU image: Ray 2.60.0 on Python 3.11 with CUDA. The Ray version is deploy/raycluster.yaml's
# spec.rayVersion, and both sit inside pyproject.toml's ray and requires-python ranges
# (tests/test_deploy.py checks all of them).
FROM rayproject/ray:2.60.0-py311-gpu

# The base image runs as `ray` (uid 1000, gid 100), and pip's build writes next to the sources
# (build/, *.egg-info), so the folder and the sources must be that user's: the folder is made by
# that user, as WORKDIR alone would make it root's.
RUN mkdir -p /home/ray/erase-src
WORKDIR /home/ray/erase-src
COPY --chown=1000:100 . .

# The project with its dependencies. torch comes from them: pip picks PyPI's default Linux wheel,
# which is the CUDA build (with its nvidia-* runtime wheels), the one this GPU image needs; the
# CPU-only build the README installs for development lives on a separate index that is not used
# here. The Ray already in the image satisfies the ray requirement, so pip keeps it.
# psycopg2-binary and boto3 let the same image run the MLflow server against PostgreSQL and
# S3-compatible artifact stores.
RUN pip install --no-cache-dir . psycopg2-binary boto3

WORKDIR /home/ray
