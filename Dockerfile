# saevctl on a CUDA PyTorch base; `docker run --gpus all IMAGE extract --model ... --images /data ...`
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PIP_NO_CACHE_DIR=1 \
    SAEVCTL_CACHE=/cache/saevctl \
    PYTHONUNBUFFERED=1

WORKDIR /opt/saevctl
COPY pyproject.toml README.md ./
COPY saevctl ./saevctl
# faiss-gpu for the neighbour indexes on GPU; the code falls back to faiss-cpu when it is absent.
RUN pip install '.[gpu]'

VOLUME ["/cache", "/work"]
WORKDIR /work
ENTRYPOINT ["saevctl"]
CMD ["--help"]
