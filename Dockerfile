# One image for every xray-triage process; docker-compose.yml picks the command.
# Built from the wheel, so the image holds exactly what `pip install` of a release holds
# (migrations, shipped model, templates) and nothing of the checkout beside it.
FROM python:3.11-slim-bookworm AS wheel
WORKDIR /src
COPY . .
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
# DCMTK: echoscu/storescu for IT staff checking the DICOM path from inside the container.
RUN apt-get update && apt-get install -y --no-install-recommends dcmtk && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 xray \
    && useradd --system --uid 10001 --gid xray --home-dir /var/lib/xray-triage --shell /usr/sbin/nologin xray \
    && install -d -o xray -g xray -m 0750 /var/lib/xray-triage
COPY --from=wheel /wheels /wheels
RUN pip install --no-cache-dir "$(ls /wheels/xray_triage-*.whl)[ml]" && rm -rf /wheels
# Spool, heatmaps and the web app's key live in the one data folder (a volume).
ENV XRAY_TRIAGE_VAR=/var/lib/xray-triage XRAY_TRIAGE_HOME=/var/lib/xray-triage
VOLUME /var/lib/xray-triage
WORKDIR /var/lib/xray-triage
# Never root: a flaw in DICOM or HTTP parsing then reaches one unprivileged account's files.
USER 10001:10001
ENTRYPOINT ["xray-triage"]
CMD ["--help"]
