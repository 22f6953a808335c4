# One image for every xray-triage process; docker-compose.yml picks the command.
FROM python:3.11-slim-bookworm
RUN apt-get update && apt-get install -y --no-install-recommends dcmtk && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY setup.cfg pyproject.toml README.md ./
# The rooms, bottom to top (docs/architecture.md).
COPY settings settings
COPY db db
COPY broker broker
COPY dicom_io dicom_io
COPY models models
COPY triage triage
COPY worker worker
COPY worklist worklist
COPY xray_triage xray_triage
COPY training training
RUN pip install --no-cache-dir '.[ml]'
ENV XRAY_TRIAGE_VAR=/var/lib/xray-triage
VOLUME /var/lib/xray-triage
ENTRYPOINT ["xray-triage"]
