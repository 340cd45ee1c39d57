# saevctl on a CUDA PyTorch base; `docker run --gpus all IMAGE extract --model ... --images /data ...`
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PIP_NO_CACHE_DIR=1 \
    SAEVCTL_CACHE=/cache/saevctl \
    PYTHONUNBUFFERED=1

WORKDIR /opt/saevctl
COPY pyproject.toml README.md ./
COPY saevctl ./saevctl
# faiss-gpu for the neighbour indexes on GPU; the code falls back to faiss-cpu when it is absent.
# faiss-cpu (a base dependency) and faiss-gpu both install the `faiss` package folder: drop the CPU one
# and reinstall the GPU one over the half-removed folder, so that `import faiss` is the GPU build.
RUN pip install '.[gpu,hf]' \
 && pip uninstall -y faiss-cpu \
 && pip install --force-reinstall --no-deps faiss-gpu-cu12

VOLUME ["/cache", "/work"]
WORKDIR /work
ENTRYPOINT ["saevctl"]
CMD ["--help"]
