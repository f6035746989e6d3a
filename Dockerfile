# The RLHF pipeline on one NVIDIA GPU.
#   docker build -t gpt2-rlhf .
#   docker run --gpus all -v hf-cache:/home/rlhf/.cache/huggingface -v "$PWD/out:/work" gpt2-rlhf
#   docker run --gpus all gpt2-rlhf --preset tiny --work_dir /work      # the offline demo
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/home/rlhf/.cache/huggingface \
    MPLBACKEND=Agg

# The image's CUDA torch already satisfies requirements.txt's lower bound, so pip keeps it.
COPY requirements.txt /tmp/requirements.txt
RUN pip install -r /tmp/requirements.txt

RUN useradd --create-home --uid 1000 rlhf && mkdir -p /work /home/rlhf/.cache/huggingface \
    && chown -R rlhf:rlhf /work /home/rlhf/.cache
WORKDIR /app
COPY --chown=rlhf:rlhf . /app
USER rlhf

# Models and data sets downloaded from the hub are kept between runs.
VOLUME ["/home/rlhf/.cache/huggingface", "/work"]
ENTRYPOINT ["bash", "run_pipeline.sh"]
CMD ["--work_dir", "/work"]
