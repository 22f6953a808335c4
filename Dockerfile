# One image for every xray-triage process; docker-compose.yml picks the command.
FROM python:3.11-slim-bookworm
RUN apt-get update && apt-get install -y --no-install-recommends dcmtk && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY setup.cfg pyproject.toml README.md ./
COPY dicom_io dicom_io
COPY db db
COPY worker worker
COPY models models
COPY training training
COPY worklist worklist
RUN pip install --no-cache-dir '.[ml]'
ENV XRAY_TRIAGE_VAR=/var/lib/xray-triage
VOLUME /var/lib/xray-triage
ENTRYPOINT ["xray-triage"]
