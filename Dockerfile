# What `make setup` does, in an image: boa, its packaged model and corpora, ready for `boa quantize`.
FROM python:3.11-slim
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends make gcc g++ && rm -rf /var/lib/apt/lists/*
WORKDIR /boa
COPY . .
# TORCH: any release in setup.py's range; e.g. --build-arg TORCH=torch==2.11.0 for the GPU machines' build.
ARG TORCH=torch==2.13.0
RUN make setup TORCH=$TORCH
ENV PATH="/boa/.venv/bin:$PATH"
ENTRYPOINT ["boa"]
